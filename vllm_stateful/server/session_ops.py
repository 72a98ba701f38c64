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
* Export is the durable state as JSON; import creates a new session from it
  (``cold``: its KV is re-prefilled, or loaded from a KV tier, on first use),
  refusing another model's tokens and a digest that does not match.
"""

from __future__ import annotations

import time
from typing import Any

from vllm_stateful.engine.session_pins import token_digest
from vllm_stateful.server.service import SessionService, ensure_open
from vllm_stateful.sessions.durable import Checkpoint
from vllm_stateful.sessions.store import Session, SessionError

EXPORT_FORMAT = "vllm-stateful.session.v1"


class SessionOps:
    def __init__(self, service: SessionService) -> None:
        self.service = service

    async def _quiesce(self, session: Session) -> None:
        """Acknowledged appends ingested and the write lock taken (caller releases it)."""
        service = self.service
        if session.turn_in_flight:
            raise SessionError(409, f"session '{session.id}' is busy with a committing request", "session_busy")
        await service.wait_ingested(session, session.acked_seq, inherit=False)
        await service._acquire(session)
        if session.turn_in_flight or session.pending_appends:
            session.write_lock.release()
            raise SessionError(409, f"session '{session.id}' is busy with a committing request", "session_busy")
        try:
            ensure_open(session)
        except SessionError:
            session.write_lock.release()
            raise

    # --- fork -------------------------------------------------------------------

    async def fork(self, parent: Session, new_id: str | None, ttl_s: float | None) -> Session:
        service = self.service
        assert service.ledger is not None
        await self._quiesce(parent)
        child = None
        try:
            child = service.store.create(parent.tenant, new_id, parent.ttl_s if ttl_s is None else ttl_s)
            child.token_ids = list(parent.token_ids)
            child.messages = list(parent.messages)
            child.pending_chat_text = parent.pending_chat_text
            child.version = child.committed_version = parent.committed_version
            child.checkpoints = list(parent.checkpoints)
            child.kv_tokens = parent.kv_tokens
            tokens = child.token_ids
            res = await service.admit(child, len(tokens), what="this fork", known=tokens)
            info = await service.bridge.call("fork", key=parent.key, new_key=child.key)
            service.kv.apply(child, info, child.kv_tokens)
            service.ledger.settle(res, len(tokens), tokens, child.pinned_tokens)
            await service.durable.put(child)
            service.metrics.forks.inc()
            return child
        except BaseException:
            if child is not None:
                await service.close(child, reason="failed")
            raise
        finally:
            parent.write_lock.release()

    # --- rewind -------------------------------------------------------------------

    async def rewind(self, session: Session, version: int) -> Session:
        service = self.service
        assert service.ledger is not None
        await self._quiesce(session)
        try:
            point = self._point(session, version)
            if point.version == session.version and point.n_tokens == len(session.token_ids):
                return session
            info = await service.kv.sync(session, point.n_tokens)
            session.token_ids = session.token_ids[: point.n_tokens]
            session.messages = session.messages[: point.n_messages]
            session.pending_chat_text = point.pending_chat_text
            session.version = session.committed_version = point.version
            session.checkpoints = [p for p in session.checkpoints if p.version <= point.version]
            service.kv.apply(session, info, min(session.kv_tokens, point.n_tokens))
            service.ledger.set_committed(session.key, point.n_tokens, session.token_ids, session.pinned_tokens)
            for query in session.flash.values():
                if query.answer is not None and query.answer.version > point.version:
                    query.answer = None
            service._committed(session, complete=True, version=point.version)
            session.events.publish("rewound", {"version": session.version, "context_tokens": session.context_tokens})
            await service.durable.put(session)
            service.metrics.rewinds.inc()
            return session
        finally:
            session.write_lock.release()

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

    # --- export / import -------------------------------------------------------------

    async def export(self, session: Session) -> dict[str, Any]:
        await self._quiesce(session)
        try:
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
                "flash_queries": [{"name": q.name, **q.request} for q in session.flash.values()],
            }
        finally:
            session.write_lock.release()

    async def import_(self, tenant: str, data: dict[str, Any], new_id: str | None) -> Session:
        """``data``: an export, validated by ``protocol.ImportRequest`` (shapes) and here (meaning)."""
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
        points = sorted((Checkpoint(**p) for p in data.get("checkpoints") or []), key=lambda p: p.version)
        points = [p for p in points if p.n_tokens <= len(tokens) and p.n_messages <= len(data["messages"])]
        session = service.store.create(tenant, new_id or data["id"], data.get("ttl_s"))
        try:
            session.token_ids = tokens
            session.messages = list(data["messages"])
            session.pending_chat_text = data.get("pending_chat_text") or ""
            session.version = session.committed_version = int(data["version"])
            session.checkpoints = [p for p in points if p.version <= session.version] or [
                Checkpoint(session.version, len(tokens), len(session.messages), session.pending_chat_text)
            ]
            session.kv_tokens = len(tokens)
            session.state = "cold" if tokens else "resident"
            session.restored = {"from": "import", "kv": "pending"} if tokens else None
            res = await service.admit(session, len(tokens), what="this import", known=tokens)
            service.ledger.settle(res, len(tokens), tokens, len(tokens))
            await service.durable.put(session)
            return session
        except BaseException:
            await service.close(session, reason="failed")
            raise
