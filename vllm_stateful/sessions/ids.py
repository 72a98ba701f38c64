"""Session id rules (API.md): 1-128 characters of ``A-Za-z0-9._:-``."""

from __future__ import annotations

import re
import secrets

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def is_valid_session_id(value: object) -> bool:
    return isinstance(value, str) and bool(_SESSION_ID.match(value))


def new_session_id() -> str:
    """An unguessable id: 128 random bits."""
    return "sess_" + secrets.token_hex(16)
