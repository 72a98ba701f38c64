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

A tag may also carry a *prefix reference* (``PrefixRef``): the request's prompt
then holds only the tokens after the session's first ``tokens`` pinned tokens,
which the engine splices back in from its pin (see ``engine/prefix_refs.py``).
The reference is under the same MAC.
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
REF_KEY = "stateful_ref"
# The stop reason of a request the engine finished unrun because it could not resolve its prefix
# reference (see ``engine/prefix_refs.py``); with finish reason "error" and no token, nothing else.
UNRESOLVED_STOP_REASON = "vllm_stateful_unresolved_reference"
RESERVED_PREFIX = "stateful_"


@dataclass(frozen=True)
class PrefixRef:
    """A request's claim: its prompt starts with the first ``tokens`` tokens of the session's pin
    as of the engine's sync ``generation`` of that session; the prompt sent omits them."""

    generation: int
    tokens: int


@dataclass(frozen=True)
class SessionTag:
    key: str  # the session incarnation's engine key
    commit: bool
    prefix: PrefixRef | None = None


def _mac(secret: bytes, key: str, commit: bool, prefix: PrefixRef | None = None) -> str:
    ref = "" if prefix is None else f"|{prefix.generation}|{prefix.tokens}"
    return hmac.new(secret, f"{key}|{int(commit)}{ref}".encode(), hashlib.sha256).hexdigest()


def make_extra_args(secret: bytes, key: str, commit: bool, prefix: PrefixRef | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {SESSION_KEY: key, COMMIT_KEY: bool(commit), MAC_KEY: _mac(secret, key, commit, prefix)}
    if prefix is not None:
        args[REF_KEY] = [prefix.generation, prefix.tokens]
    return args


def with_prefix(extra_args: dict[str, Any], secret: bytes, prefix: PrefixRef) -> dict[str, Any]:
    """``extra_args`` (carrying a tag this process made) with ``prefix`` added under a new MAC."""
    tagged = make_extra_args(secret, extra_args[SESSION_KEY], extra_args[COMMIT_KEY], prefix)
    return {**extra_args, **tagged}


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
    prefix: PrefixRef | None = None
    if REF_KEY in extra_args:
        ref = extra_args[REF_KEY]
        if not (
            isinstance(ref, (list, tuple))
            and len(ref) == 2
            and all(type(v) is int for v in ref)
            and ref[0] >= 0
            and ref[1] > 0
        ):
            return None, True
        prefix = PrefixRef(generation=ref[0], tokens=ref[1])
    if not hmac.compare_digest(mac, _mac(secret, key, commit, prefix)):
        return None, True
    return SessionTag(key=key, commit=commit, prefix=prefix), False
