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
from typing import Any

from vllm_stateful.sessions.durable import Checkpoint, DurableStore, SessionRecord
from vllm_stateful.sessions.store import Session, SessionError

logger = logging.getLogger(__name__)


def scalars(session: Session) -> dict[str, Any]:
    return {
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
    }


def record_of(session: Session, appends: list[tuple[int, dict[str, Any]]] | None = None) -> SessionRecord:
    """The whole session as stored (flash registrations included, by their request bodies)."""
    flash = [(fid, flash_body(q)) for fid, q in session.flash.items()]
    return SessionRecord(
        session.key,
        scalars(session),
        list(session.token_ids),
        list(session.messages),
        list(session.checkpoints),
        list(appends or []),
        flash,
    )


def flash_body(query: Any) -> dict[str, Any]:
    return {"name": query.name, "created_at": query.created_at, **query.request}


class Durability:
    def __init__(self, store: DurableStore | None) -> None:
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.store is not None

    async def _write(self, session: Session, fn, *args: Any) -> None:
        if self.store is None:
            return
        try:
            await self.store.run(fn, *args)
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
        self,
        session: Session,
        tokens_before: int,
        messages_before: int,
        points: list[Checkpoint],
        ingested_seq: int | None = None,
    ) -> None:
        """``session`` changed (already applied in memory): tokens and messages after the given
        counts are new, ``points`` are its new rewind points."""
        if self.store is None:
            return
        oldest = session.checkpoints[0].version if session.checkpoints else session.version
        await self._write(
            session,
            self.store.commit,
            session.key,
            scalars(session),
            tokens_before,
            session.token_ids[tokens_before:],
            messages_before,
            session.messages[messages_before:],
            points,
            oldest,
            ingested_seq,
        )

    async def append(self, session: Session, seq: int, body: dict[str, Any]) -> None:
        if self.store is not None:
            await self._write(session, self.store.add_append, session.key, scalars(session), seq, body)

    async def put(self, session: Session, appends: list[tuple[int, dict[str, Any]]] | None = None) -> None:
        if self.store is not None:
            await self._write(session, self.store.put, record_of(session, appends))

    async def flash(self, session: Session, fid: str, body: dict[str, Any] | None) -> None:
        if self.store is not None:
            await self._write(session, self.store.put_flash, session.key, fid, body)

    async def delete(self, session: Session) -> None:
        """Best effort: a delete that fails is logged (the session is already gone from memory;
        a restart would bring it back)."""
        if self.store is None:
            return
        try:
            await self.store.run(self.store.delete, session.key)
        except Exception:
            logger.exception("vllm-stateful: could not delete session %s from the state dir", session.id)
