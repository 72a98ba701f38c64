"""How a request tells the engine which session it belongs to, and why a
client cannot forge it.

The API server puts these keys in ``SamplingParams.extra_args``, which reaches
the engine core's ``Request`` unchanged. Clients can put anything in
``extra_args`` too (vLLM copies a request's ``vllm_xargs`` there, on every
route, including ``/invocations`` which vLLM leaves outside ``--api-key``), so
a tag is only honoured with a MAC: an HMAC-SHA256 of the session key and the
commit flag under a per-process secret that the API server hands to the
engine at startup (``handshake``) and never sends anywhere else. A tag whose
MAC does not verify is treated as no tag at all: the request runs as an
ordinary one and can neither read nor pin any session's KV.
No vLLM import.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

SESSION_KEY = "stateful_session"
COMMIT_KEY = "stateful_commit"
MAC_KEY = "stateful_mac"
RESERVED_PREFIX = "stateful_"


@dataclass(frozen=True)
class SessionTag:
    key: str  # the session incarnation's engine key
    commit: bool


def _mac(secret: bytes, key: str, commit: bool) -> str:
    return hmac.new(secret, f"{key}|{int(commit)}".encode(), hashlib.sha256).hexdigest()


def make_extra_args(secret: bytes, key: str, commit: bool) -> dict[str, Any]:
    return {SESSION_KEY: key, COMMIT_KEY: bool(commit), MAC_KEY: _mac(secret, key, commit)}


def reserved_keys(extra_args: dict[str, Any] | None) -> list[str]:
    """Keys of ``extra_args`` that only the plugin may set."""
    return sorted(k for k in (extra_args or {}) if isinstance(k, str) and k.startswith(RESERVED_PREFIX))


def read_tag(extra_args: dict[str, Any] | None, secret: bytes | None) -> tuple[SessionTag | None, bool]:
    """``(tag, forged)``: the verified session tag, or None; ``forged`` is True
    when the request carried a session key that did not verify."""
    if not extra_args or SESSION_KEY not in extra_args:
        return None, False
    key, commit, mac = extra_args.get(SESSION_KEY), extra_args.get(COMMIT_KEY), extra_args.get(MAC_KEY)
    if not secret or not isinstance(key, str) or not key or not isinstance(commit, bool) or not isinstance(mac, str):
        return None, True
    if not hmac.compare_digest(mac, _mac(secret, key, commit)):
        return None, True
    return SessionTag(key=key, commit=commit), False
