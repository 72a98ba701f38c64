"""Whole-session operations: fork, rewind, export and import (HTTP-free).

Contracts:
* Each operation first waits (bounded) for the session's acknowledged appends
  to be ingested and takes its write lock, so it sees and changes one committed
  state; a committing request in flight on it is a 409.
* Fork: the child gets the parent's committed tokens, messages, version and
  rewind points, and pins the parent's KV blocks (one more reference on each:
  no prefill, no block allocated). It is charged only for what is not shared:
  full blocks are charged once per tenant (``CellLedger``), the partial last
  block to each session (it is copied when either grows). Flash queries are
  not copied.
* Rewind to version N: the session becomes exactly what it was at N (tokens,
  messages, pending template text), its pin and charge are trimmed, flash
  answers newer than N are dropped (and re-evaluated), and ``version`` is N
  again. Only versions kept in the window (``rewind_window``) and whose content
  is a prefix of the history can be returned to; others are a 409.
* Move (data parallelism): the session's KV leaves its rank; it is rebuilt on the
  new one by its next request (``recomputed_tokens``), its tokens unchanged.
* Export is the durable state as JSON; import creates a new session from it
  (``cold``: its KV is re-prefilled, or loaded from a KV tier, on first use),
  refusing another model's tokens and a digest that does not match.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from vllm_stateful.engine.session_pins import token_digest
from vllm_stateful.server.durability import flash_body, record_of
from vllm_stateful.server.ingest import refuse_if_exclusive
from vllm_stateful.server.service import SessionService, ensure_open
from vllm_stateful.server.session_kv import finish_then_cancel, survive_cancellation
from vllm_stateful.sessions.durable import Checkpoint, SessionRecord
from vllm_stateful.sessions.store import Session, SessionError

EXPORT_FORMAT = "vllm-stateful.session.v1"


def revision_tag(session: Session) -> str:
    """Names one saved state of one incarnation (``Session.revision``)."""
    return f"{session.key}:{session.revision}"


class SessionOps:
    def __init__(self, service: SessionService) -> None:
        self.service = service

    @asynccontextmanager
    async def _exclusive(self, session: Session) -> AsyncIterator[None]:
        """The session quiet and held: acknowledged appends ingested, its write lock taken (no turn
        or ingestion runs), new appends refused with 409 until the block ends."""
        service = self.service
        refuse_if_exclusive(session)
        if session.turn_in_flight:
            raise SessionError(409, f"session '{session.id}' is busy with a committing request", "session_busy")
        await service.wait_ingested(session, session.acked_seq, inherit=False)
        await service._acquire(session)
        try:
            if session.turn_in_flight or session.pending_appends or session.exclusive:
                raise SessionError(409, f"session '{session.id}' is busy with a committing request", "session_busy")
            ensure_open(session)
            session.exclusive = True
            try:
                yield
            finally:
                session.exclusive = False
        finally:
            session.write_lock.release()

    # --- fork -------------------------------------------------------------------

    async def fork(self, parent: Session, new_id: str | None, ttl_s: float | None) -> Session:
        service = self.service
        assert service.ledger is not None
        async with self._exclusive(parent):
            child = service.store.create(parent.tenant, new_id, parent.ttl_s if ttl_s is None else ttl_s)
            child.data_parallel_rank = parent.data_parallel_rank  # it pins the parent's blocks, on that engine
            try:
                child.token_ids = list(parent.token_ids)
                child.messages = list(parent.messages)
                child.pending_chat_text = parent.pending_chat_text
                child.version = child.committed_version = parent.committed_version
                child.checkpoints = list(parent.checkpoints)
                child.newest_applied = parent.newest_applied
                child.kv_tokens = parent.kv_tokens
                tokens = child.token_ids
                res = await service.admit(child, len(tokens), what="this fork", known=tokens)
                info = await service.kv.call(parent, "fork", new_key=child.key)
                service.kv.apply(child, info, child.kv_tokens)
                # charged by content even while neither pins it: whichever rebuilds it first pins it for both
                service.ledger.settle(res, len(tokens), tokens)
                await service.durable.put(child)
                service.metrics.forks.inc()
                return child
            except BaseException:
                await survive_cancellation(service.close(child, reason="failed"))
                raise

    # --- rewind -------------------------------------------------------------------

    async def rewind(self, session: Session, version: int) -> Session:
        service = self.service
        assert service.ledger is not None
        async with self._exclusive(session):
            point = self._point(session, version)
            if point.version == session.version and point.n_tokens == len(session.token_ids):
                return session
            charged = service.ledger.committed_tokens(session.key) >= len(session.token_ids)
            kept = session.token_ids[: point.n_tokens]
            if charged and not service.ledger.fits_committed(session.key, point.n_tokens, kept, point.n_tokens):
                raise SessionError(
                    429, "rewinding would turn blocks this session shares (a fork's) into private ones beyond "
                    "the cell budget; retry later", "cell_budget_exceeded", retry_after=1.0,
                )  # fmt: skip
            info = await service.kv.sync(session, point.n_tokens)
            ensure_open(session)
            # saved before it is applied: the session rewritten as it is at the point
            record = record_of(session)
            record.token_ids = session.token_ids[: point.n_tokens]
            record.messages = session.messages[: point.n_messages]
            record.checkpoints = [p for p in session.checkpoints if p.version <= point.version]
            record.scalars.update(
                version=point.version, committed_version=point.version, pending_chat_text=point.pending_chat_text,
                n_tokens=point.n_tokens, n_messages=len(record.messages),
            )  # fmt: skip
            await finish_then_cancel(self._save_rewind(session, record, point, info, charged))
            service.metrics.rewinds.inc()
            return session

    async def _save_rewind(
        self, session: Session, record: SessionRecord, point: Checkpoint, info: dict[str, int], charged: bool
    ) -> None:
        """Save the rewound session, then apply it (no await between)."""
        service = self.service
        assert service.ledger is not None
        await service.durable.put(session, record)
        ensure_open(session)
        session.token_ids, session.messages = record.token_ids, record.messages
        session.pending_chat_text = point.pending_chat_text
        session.version = session.committed_version = session.newest_applied = point.version
        session.checkpoints = record.checkpoints
        session.commit_seq += 1
        service.kv.apply(session, info, min(session.kv_tokens, point.n_tokens))
        if charged:
            service.ledger.set_committed(session.key, point.n_tokens, session.token_ids, session.pinned_tokens)
        else:  # its KV is out of the pool: it stays uncharged, shorter
            service.ledger.uncharge(session.key, history=point.n_tokens)
        for query in session.flash.values():
            query.forget_after(point.version, point.n_tokens, session.commit_seq)
        session.events.publish("rewound", {"version": session.version, "context_tokens": session.context_tokens})
        service._announce(session)

    def _point(self, session: Session, version: int) -> Checkpoint:
        for point in session.checkpoints:
            if point.version == version:
                return point
        kept = [p.version for p in session.checkpoints]
        window = self.service.config.rewind_window
        if version > session.version:
            why = f"the session is at version {session.version}"
        elif kept and version < kept[0]:
            why = f"it is older than the rewind window ({window} versions; oldest kept: {kept[0]})"
        else:
            why = "its content is not a prefix of the history (an append ingested after a later turn)"
        raise SessionError(
            409, f"session '{session.id}' cannot be rewound to version {version}: {why}", "version_unavailable"
        )

    # --- move (data parallelism) ---------------------------------------------------------

    async def move(self, session: Session, rank: int) -> Session:
        """Move the session to data-parallel rank ``rank``. Its pin on the old rank is dropped and its
        next request re-prefills the history there (``recomputed_tokens`` says how much); tokens,
        messages, version and flash queries stay. It is charged on the new rank if it fits now,
        else when next used (as a spilled session). The new rank is saved before it is applied."""
        service = self.service
        assert service.ledger is not None
        if not 0 <= rank < service.bridge.dp_size:
            raise SessionError(400, f"data_parallel_rank must be in 0..{service.bridge.dp_size - 1}", "invalid_request")
        async with self._exclusive(session):
            if rank == session.data_parallel_rank:
                return session
            info = await service.kv.call(session, "leave")  # nothing admitted before pins there again
            # its KV left: cold from here on, whatever follows (kv_tokens reports the rebuild)
            service.kv.apply(session, info, session.kv_tokens)
            ensure_open(session)
            record = record_of(session)
            record.scalars["data_parallel_rank"] = rank
            await finish_then_cancel(self._save_move(session, record, rank))
            service.metrics.moves.inc()
            return session

    async def _save_move(self, session: Session, record: SessionRecord, rank: int) -> None:
        """Save the new rank, then apply it (no await between)."""
        service = self.service
        assert service.ledger is not None
        await service.durable.put(session, record)
        ensure_open(session)
        service.ledger.move(session.key, rank, session.tenant, session.token_ids)
        session.data_parallel_rank = rank
        session.events.publish("moved", {"version": session.version, "data_parallel_rank": rank})

    # --- export / import -------------------------------------------------------------

    async def export(self, session: Session) -> dict[str, Any]:
        async with self._exclusive(session):
            return {
                "object": "session.export",
                "format": EXPORT_FORMAT,
                "model": self.service.bridge.served_model_names[0],
                "id": session.id,
                "version": session.version,
                "ttl_s": session.ttl_s,
                "created_at": session.created_at,
                "exported_at": time.time(),
                "token_ids": list(session.token_ids),
                "digest": token_digest(session.token_ids),
                "messages": list(session.messages),
                "pending_chat_text": session.pending_chat_text,
                "checkpoints": [vars(p) for p in session.checkpoints],
                "flash_queries": [flash_body(q) for q in session.flash.values()],
                "data_parallel_rank": session.data_parallel_rank,  # informative: an import is placed anew
                "revision": revision_tag(session),  # DELETE ?if_revision= removes exactly this state
            }

    async def import_(self, tenant: str, data: dict[str, Any], register: Callable[[Session], None]) -> Session:
        """``data``: an export, validated by ``protocol.ImportRequest`` (shapes) and here (meaning);
        ``register(session)`` adds its flash queries (may raise: then nothing is created)."""
        service = self.service
        assert service.ledger is not None
        tokens = list(data["token_ids"])
        if data["format"] != EXPORT_FORMAT:
            raise SessionError(400, f"unknown export format {data['format']!r}; want {EXPORT_FORMAT}", "invalid_export")
        if data.get("model") not in (None, *service.bridge.served_model_names):
            raise SessionError(
                400, f"the export is of model {data['model']!r}; this server serves "
                f"{service.bridge.served_model_names}", "model_mismatch",
            )  # fmt: skip
        if data.get("digest") is not None and data["digest"] != token_digest(tokens):
            raise SessionError(400, "the export's token_ids do not match its digest", "invalid_export")
        if len(tokens) >= service.bridge.max_model_len:
            raise SessionError(
                413, f"{len(tokens)} tokens leave no room in the model's context length", "context_length_exceeded"
            )
        version = int(data["version"])
        n_messages = len(data["messages"])
        by_version = {p["version"]: Checkpoint(**p) for p in data.get("checkpoints") or []}
        points = [
            p for _, p in sorted(by_version.items())
            if p.version <= version and p.n_tokens <= len(tokens) and p.n_messages <= n_messages
        ]  # fmt: skip
        session = service.store.create(tenant, data["id"], data.get("ttl_s"))
        try:
            session.token_ids = tokens
            session.messages = list(data["messages"])
            session.pending_chat_text = data.get("pending_chat_text") or ""
            session.version = session.committed_version = session.newest_applied = version
            session.checkpoints = points or [
                Checkpoint(version, len(tokens), len(session.messages), session.pending_chat_text)
            ]
            session.kv_tokens = len(tokens)
            session.state = "cold" if tokens else "resident"
            session.restored = {"from": "import", "kv": "pending"} if tokens else None
            register(session)
            res = await service.admit(session, len(tokens), what="this import", known=tokens)
            service.ledger.settle(res, len(tokens), tokens)
            await service.durable.put(session)
            return session
        except BaseException:
            await survive_cancellation(service.close(session, reason="failed"))
            raise
