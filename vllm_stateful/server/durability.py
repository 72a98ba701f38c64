"""The API server's link to durable session state: what each committed change
writes, and nothing else.

Contract: a change is acknowledged to its client only after the write it makes
here returned (``sessions/durable.py`` commits each write before returning).
A write that fails leaves the session ``failed`` (its in-memory state is no
longer backed by the disk: every request on it is 409 until it is deleted) and
the request that made the change gets a 503; nothing is acknowledged that a
restart could lose. With durability off every call is a no-op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vllm_stateful.sessions.durable import Checkpoint, DurableStore, SessionRecord
from vllm_stateful.sessions.store import Session, SessionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """A session's committed state after a change, saved before it is applied."""

    token_ids: list[int]
    messages: list[dict[str, Any]]
    pending_chat_text: str
    committed_version: int
    # the newest version whose change it holds (its rewind points' bound, kept across a restart)
    applied_version: int


def scalars(session: Session, change: Change | None = None) -> dict[str, Any]:
    """The session's row; with ``change``: as it will be once the change is applied."""
    row = {
        "tenant": session.tenant,
        "id": session.id,
        "ttl_s": session.ttl_s,
        "created_at": session.created_at,
        "last_used_at": session.last_used_at,
        "version": session.version,
        "committed_version": session.committed_version,
        "acked_seq": session.acked_seq,
        "ingested_seq": session.ingested_seq,
        "pending_chat_text": session.pending_chat_text,
        "n_tokens": len(session.token_ids),
        "n_messages": len(session.messages),
        "data_parallel_rank": session.data_parallel_rank,
        "newest_applied": session.newest_applied,
    }
    if change is not None:
        row.update(
            newest_applied=max(session.newest_applied, change.applied_version),
            committed_version=change.committed_version,
            pending_chat_text=change.pending_chat_text,
            n_tokens=len(change.token_ids),
            n_messages=len(change.messages),
        )
    return row


def record_of(session: Session) -> SessionRecord:
    """The whole session as stored: flash registrations by their request bodies, and the
    appends acknowledged but not yet ingested (a rewrite must not lose them)."""
    flash = [(fid, flash_body(q)) for fid, q in session.flash.items()]
    appends = [(item.seq, item.body()) for item in session.pending_appends]
    return SessionRecord(
        session.key,
        scalars(session),
        list(session.token_ids),
        list(session.messages),
        list(session.checkpoints),
        appends,
        flash,
    )


def flash_body(query: Any) -> dict[str, Any]:
    return {"name": query.name, "created_at": query.created_at, **query.request}


class Durability:
    def __init__(self, store: DurableStore | None, rewind_window: int = 64) -> None:
        self.store = store
        self.rewind_window = rewind_window

    @property
    def enabled(self) -> bool:
        return self.store is not None

    async def _write(self, session: Session, fn, *args: Any, whole: bool = False) -> None:
        """``whole``: the write holds the session's row and every rewind point (commit, put)."""
        if self.store is None:
            return
        if session.state == "closed":  # its delete is queued already: a later write would revive it
            raise SessionError(404, f"session '{session.id}' was closed", "session_not_found")
        try:
            await self.store.run(fn, *args)
            session.saved = session.saved or whole
            session.revision += 1
        except Exception as exc:
            logger.exception("vllm-stateful: could not save session %s", session.id)
            if session.is_open:
                session.state = "failed"
                session.error = f"its state could not be saved ({type(exc).__name__}: {exc})"
            raise SessionError(
                503, f"the change could not be saved to the state dir ({exc}); the session is failed, delete it",
                "state_not_saved",
            ) from exc  # fmt: skip

    async def commit(
        self, session: Session, change: Change, points: list[Checkpoint], ingested_seq: int | None = None
    ) -> None:
        """Save ``change`` (not yet applied: the session still holds its old state, which the change
        extends) with its new rewind ``points``; ``ingested_seq``: the appends it consumed."""
        if self.store is None:
            return
        tokens_before, messages_before = len(session.token_ids), len(session.messages)
        if not session.saved:  # the first write of a session created by its first turn: every point
            points = [*session.checkpoints, *points]
        oldest = session.version - self.rewind_window  # as Session.add_checkpoint prunes
        await self._write(
            session,
            self.store.commit,
            session.key,
            scalars(session, change),
            tokens_before,
            change.token_ids[tokens_before:],
            messages_before,
            change.messages[messages_before:],
            points,
            oldest,
            ingested_seq,
            whole=True,
        )

    async def append(self, session: Session, seq: int, body: dict[str, Any]) -> None:
        if self.store is not None:
            await self._write(session, self.store.add_append, session.key, scalars(session), seq, body)

    async def put(self, session: Session, record: SessionRecord | None = None) -> None:
        """Rewrite the session whole (``record``: as it will be, when the change is not applied yet)."""
        if self.store is not None:
            await self._write(session, self.store.put, record or record_of(session), whole=True)

    async def flash(self, session: Session, fid: str, body: dict[str, Any] | None) -> None:
        if self.store is not None:
            await self._write(session, self.store.put_flash, session.key, fid, body)

    async def delete(self, session: Session) -> None:
        """Remove the session's rows; 503 when that fails (the session is gone from memory, but a
        restart would bring it back: the close is not acknowledged)."""
        if self.store is None:
            return
        try:
            await self.store.run(self.store.delete, session.key)
        except Exception as exc:
            logger.exception("vllm-stateful: could not delete session %s from the state dir", session.id)
            raise SessionError(
                503, f"the session was closed but could not be removed from the state dir ({exc})", "state_not_saved"
            ) from exc
