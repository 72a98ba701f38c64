"""The API server's authoritative session state (tokens, messages, version).

The token history lives here, next to the tokenizer and chat template; the
engine only holds pinned KV blocks keyed by session id and reports how many
tokens they cover (see docs/architecture.md). Single-threaded asyncio: no
locks beyond the per-session write lock, which orders turns and ingestion.
No vLLM import.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from vllm_stateful.sessions.ids import new_session_id


class SessionError(Exception):
    """A refused session operation: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, code: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


@dataclass
class Session:
    id: str
    ttl_s: float
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    version: int = 0
    token_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # Text the chat template still owes after the last generated reply.
    pending_chat_text: str = ""
    # What the engine reported after the last commit.
    kv_tokens: int = 0
    pinned_blocks: int = 0
    # resident: KV pinned on the device; failed: acknowledged data could not be
    # ingested (see ``error``), the session refuses further use; closed: removed.
    state: str = "resident"
    error: str | None = None
    turn_in_flight: bool = False
    # Engine requests running on this session's KV (turns, queries, ingestion).
    active_request_ids: set[str] = field(default_factory=set)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Read-your-writes: appends acknowledged vs ingested, as sequence numbers.
    acked_seq: int = 0
    ingested_seq: int = 0
    queued_tokens: int = 0
    ingest_cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def context_tokens(self) -> int:
        return len(self.token_ids)

    def touch(self) -> None:
        self.last_used_at = time.time()

    def expired(self, now: float) -> bool:
        return self.ttl_s > 0 and not self.turn_in_flight and now - self.last_used_at > self.ttl_s

    def to_public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "session",
            "version": self.version,
            "context_tokens": self.context_tokens,
            "pinned_blocks": self.pinned_blocks,
            "state": self.state,
            **({"error": self.error} if self.error else {}),
            "created_at": int(self.created_at),
            "last_used_at": int(self.last_used_at),
            "ttl_s": self.ttl_s,
            "queued_tokens": self.queued_tokens,
            "flash_queries": [],
        }


class SessionStore:
    """Live sessions by id. ``get`` raises 404; ``create`` raises 409 on a taken id."""

    def __init__(self, default_ttl_s: float) -> None:
        self.default_ttl_s = default_ttl_s
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def create(self, session_id: str | None = None, ttl_s: float | None = None) -> Session:
        sid = session_id or new_session_id()
        if sid in self._sessions:
            raise SessionError(409, f"session '{sid}' already exists", "session_exists")
        session = Session(id=sid, ttl_s=self.default_ttl_s if ttl_s is None else float(ttl_s))
        self._sessions[sid] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(404, f"session '{session_id}' not found", "session_not_found")
        return session

    def get_or_create(self, session_id: str) -> Session:
        return self._sessions.get(session_id) or self.create(session_id)

    def remove(self, session_id: str) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.state = "closed"
        return session

    def expired(self, now: float | None = None) -> list[Session]:
        now = time.time() if now is None else now
        return [s for s in self._sessions.values() if s.expired(now)]

    def pinned_blocks(self) -> int:
        return sum(s.pinned_blocks for s in self._sessions.values())
