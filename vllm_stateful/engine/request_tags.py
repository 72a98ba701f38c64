"""How a request tells the engine which session it belongs to.

The API server puts these keys in ``SamplingParams.extra_args`` (vLLM's
``vllm_xargs`` path), which reaches the engine core's ``Request`` unchanged.
No vLLM import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SESSION_KEY = "stateful_session"
COMMIT_KEY = "stateful_commit"


@dataclass(frozen=True)
class SessionTag:
    session_id: str
    commit: bool


def make_extra_args(session_id: str, commit: bool) -> dict[str, Any]:
    return {SESSION_KEY: session_id, COMMIT_KEY: bool(commit)}


def session_tag(extra_args: dict[str, Any] | None) -> SessionTag | None:
    """The session a request belongs to, or None for ordinary requests."""
    if not extra_args:
        return None
    sid = extra_args.get(SESSION_KEY)
    if not isinstance(sid, str) or not sid:
        return None
    return SessionTag(session_id=sid, commit=bool(extra_args.get(COMMIT_KEY, True)))
