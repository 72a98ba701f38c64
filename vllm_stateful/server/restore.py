"""Bringing sessions back after a restart, from the state dir.

Contract: at startup, before the server answers, every session stored in the
state dir is live again with its tokens, messages, version, TTL, owner, rewind
points and flash queries; appends acknowledged but not ingested before the
restart are queued again, in order, with their versions. Restored sessions are
``cold`` (no KV yet): with ``restore: lazy`` the first request re-prefills the
history (``recomputed_tokens`` says how much; KV that a configured KV tier
still holds loads instead and is not counted), with ``restore: eager`` a
background task rebuilds it at the ingestion class, most recently used first.
The session object's ``restored`` field says how the KV came back. A restored
session's TTL counts from the restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from vllm_stateful.server.ingest import Ingestor
from vllm_stateful.server.placement import least_loaded
from vllm_stateful.server.service import SessionService, note_restored
from vllm_stateful.server.session_kv import survive_cancellation
from vllm_stateful.server.turn_types import TurnResult
from vllm_stateful.sessions.durable import SessionRecord
from vllm_stateful.sessions.store import Session, SessionError

logger = logging.getLogger(__name__)

# rebuilds a flash query from its saved registration (server/routes_flash.py)
FlashRestorer = Callable[[Session, str, dict[str, Any]], None]


def session_of(record: SessionRecord) -> Session:
    sc = record.scalars
    session = Session(id=sc["id"], tenant=sc["tenant"], ttl_s=sc["ttl_s"], key=record.key)
    session.created_at, session.last_used_at = sc["created_at"], time.time()
    session.version, session.committed_version = sc["version"], sc["committed_version"]
    session.token_ids, session.messages = record.token_ids, record.messages
    session.pending_chat_text = sc["pending_chat_text"]
    session.data_parallel_rank = int(sc.get("data_parallel_rank") or 0)
    if record.checkpoints:
        session.checkpoints = list(record.checkpoints)
    first_pending = record.appends[0][0] if record.appends else sc["acked_seq"] + 1
    session.acked_seq = session.ingested_seq = first_pending - 1  # requeued appends keep their numbers
    session.kv_tokens = len(session.token_ids)
    session.state = "cold" if session.token_ids else "resident"
    session.saved = True
    saved = int(sc.get("newest_applied") or 0)  # a turn's version can be above both (appends were pending)
    session.newest_applied = max([p.version for p in session.checkpoints] + [session.committed_version, saved])
    return session


async def restore_sessions(
    service: SessionService, ingestor: Ingestor, restore_flash: FlashRestorer, mode: str
) -> tuple[int, asyncio.Task | None]:
    """Restore every stored session; returns how many, and the eager rebuild task (if any)."""
    store = service.durable.store
    if store is None:
        return 0, None
    assert service.ledger is not None
    records = await store.run(store.load_all)
    # most recently used first: they are charged to the budget first, and rebuilt first
    records.sort(key=lambda r: -r.scalars["last_used_at"])
    restored: list[tuple[float, Session]] = []
    for record in records:
        source = {"from": "state_dir", "mode": mode}
        session = await restore_record(service, ingestor, restore_flash, record, source)
        restored.append((record.scalars["last_used_at"], session))
    if restored:
        logger.info("vllm-stateful: restored %d sessions from %s (%s)", len(restored), store.path, mode)
    task = None
    if mode == "eager" and restored:
        order = [s for _, s in restored]
        task = asyncio.get_running_loop().create_task(_rebuild(service, order))
    return len(restored), task


async def restore_record(
    service: SessionService,
    ingestor: Ingestor,
    restore_flash: FlashRestorer,
    record: SessionRecord,
    source: dict[str, Any],
) -> Session:
    """Bring one stored session into the server: in the store, charged if it fits, its flash
    queries registered and its acknowledged appends queued again. ``source`` says where from
    (the session's ``restored`` field); its KV is rebuilt on first use."""
    assert service.ledger is not None
    session = session_of(record)
    session.restored = {**source, "kv": "pending" if session.token_ids else "none"}
    if session.data_parallel_rank >= service.bridge.dp_size:  # saved with more ranks than run now
        session.data_parallel_rank = least_loaded(service.store.all(), service.bridge.dp_size)
    appends = [body for _, body in record.appends]
    estimates = await ingestor.requeue_estimates(session, appends)  # awaits: before anyone can see it
    service.store.adopt(session)
    service.ledger.restore(session.key, session.tenant, session.token_ids)
    for fid, body in record.flash:
        try:
            restore_flash(session, fid, body)
        except Exception:
            logger.exception("vllm-stateful: flash query %s of session %s not restored", fid, session.id)
    ingestor.requeue(session, appends, estimates)  # with the session visible, all at once
    service.metrics.restored.inc()
    return session


async def rebuild_kv(service: SessionService, session: Session) -> bool:
    """Rebuild the KV of a session that has none (restored, spilled) at the ingestion class, as far
    as the budget allows without spilling anyone; False when it has KV, is busy or does not fit."""
    assert service.ledger is not None
    if session.state not in ("cold", "offloaded") or session.busy or len(session.token_ids) < 2:
        return False
    async with session.write_lock:
        if session.state not in ("cold", "offloaded") or session.busy:
            return False
        try:
            service.ledger.recharge(session.key, session.token_ids)
        except SessionError:
            return False
        tokens = list(session.token_ids)
        result = TurnResult(session, len(tokens), session.kv_tokens)
        rebuilt = False
        try:
            await service.prefill(session, tokens, result, ingest_class=True, background=True)
            if result.finish_reason in ("abort", "error") or not session.is_open:
                return False
            info = await service.kv.sync(session, len(tokens))
            service.kv.apply(session, info, len(tokens))
            note_restored(session, result)
            rebuilt = True
        finally:
            if not rebuilt:
                await survive_cancellation(service.kv.rollback(session))
        return True


async def _rebuild(service: SessionService, sessions: list[Session]) -> None:
    for session in sessions:
        try:
            await rebuild_kv(service, session)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("vllm-stateful: could not rebuild the KV of restored session %s", session.id)
