"""Session id rules (API.md): 1-128 characters of ``A-Za-z0-9._:-``."""

from __future__ import annotations

import re
import secrets

_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def is_valid_session_id(value: object) -> bool:
    """The whole string must match: ``"abc\\n"`` is not a valid id."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


def new_session_id() -> str:
    """An unguessable id: 128 random bits."""
    return "sess_" + secrets.token_hex(16)


def new_incarnation_key() -> str:
    """The engine-side identity of one session incarnation (never shown to clients).

    A session id can be deleted and created again; each creation gets a fresh
    key, so nothing of an old incarnation (queued appends, pins, a late
    release) can reach a new one.
    """
    return secrets.token_hex(16)
