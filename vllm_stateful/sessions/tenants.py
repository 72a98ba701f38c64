"""Who a request belongs to, and the prefix-cache salt that keeps tenants apart.

* Each ``--api-key`` the server runs with is a tenant (vLLM accepts several).
  vLLM's middleware has already refused requests without a valid key; here the
  key only selects the tenant. A tenant id is derived from a hash of the key,
  so keys are never stored or logged.
* With ``tenant_header`` configured, the header's value names the tenant too
  (inside the key's tenant when keys are also set). Only for deployments behind
  a gateway that sets the header and strips it from client traffic.
* Without either, there is one tenant, ``default``, as in vLLM.

Salts: every session request carries ``cache_salt = salt(tenant)``, an HMAC of
the tenant under a per-process secret, so a session's blocks can only be hit
by requests of the same tenant (vLLM's block hashes start from the salt). No
vLLM import.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_stateful.sessions.ids import is_valid_session_id
from vllm_stateful.sessions.store import SessionError

DEFAULT_TENANT = "default"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class Tenancy:
    key_digests: tuple[bytes, ...] = ()
    header: str | None = None
    secret: bytes = b""

    @classmethod
    def from_settings(
        cls, api_keys: Sequence[str] | str | None, header: str | None, secret: bytes | None = None
    ) -> "Tenancy":
        """``secret``: the tag and salt secret (a durable server keeps one in its state dir, so
        cache salts, and KV saved in a KV tier, stay valid across restarts); default: a new one."""
        if isinstance(api_keys, str):
            api_keys = [api_keys]
        keys = tuple(_digest(k) for k in (api_keys or []) if k)
        return cls(
            key_digests=keys, header=header.lower() if header else None, secret=secret or secrets.token_bytes(32)
        )

    @property
    def multi_tenant(self) -> bool:
        return len(self.key_digests) > 1 or self.header is not None

    def tenant_of(self, headers: Mapping[str, str]) -> str:
        """The caller's tenant; 401 for an unknown key, 400 for a bad tenant header."""
        tenant = DEFAULT_TENANT
        if self.key_digests:
            scheme, _, token = (headers.get("authorization") or "").partition(" ")
            digest = _digest(token) if scheme.lower() == "bearer" else b""
            matches = [d for d in self.key_digests if hmac.compare_digest(d, digest)]
            if not matches:
                raise SessionError(401, "a valid API key is required", "invalid_api_key")
            tenant = "k" + matches[0].hex()[:16]
        if self.header is not None:
            value = headers.get(self.header)
            if not is_valid_session_id(value):
                raise SessionError(
                    400, f"header '{self.header}' must name the tenant (1-128 of A-Za-z0-9._:-)", "invalid_tenant"
                )
            tenant = value if tenant == DEFAULT_TENANT else f"{tenant}/{value}"
        return tenant

    def salt(self, tenant: str, client_salt: str | None = None) -> str:
        """The prefix-cache salt for ``tenant`` (mixed with a client's own salt if given)."""
        message = tenant if client_salt is None else f"{tenant}\x00{client_salt}"
        return hmac.new(self.secret, message.encode("utf-8"), hashlib.sha256).hexdigest()[:48]
