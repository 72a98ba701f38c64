"""The data plane: non-blocking appends, ingested in the background in order.

Contract:
* ``append`` acknowledges at once with the session's new version; the data is
  then prefilled into the session by one background task per session, in
  acknowledgement order, coalescing whatever has queued up into one prefill.
* Appends of one session never run concurrently with each other or with a
  committing turn (both take the session's write lock).
* The queue is bounded in tokens (``max_ingest_queue_tokens``); beyond it an
  append is refused with 429 + Retry-After and nothing is enqueued. Appends
  that would overflow the context (413) or the cell budget (429) are refused
  at acknowledgement time, so acknowledged data is never dropped.
* Read-your-writes: ``Session.acked_seq``/``ingested_seq`` let a later query
  wait for exactly the appends acknowledged before it.
* Ingestion yields to read-only queries that are generating (at most
  ``QUERY_YIELD_MAX_S`` per batch): vLLM would otherwise batch an ingest
  prefill into every decode step of the query, and on a CPU that multiplies
  the query's latency. What queued meanwhile is ingested as one larger prefill.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from vllm_stateful.server.service import SessionService, TurnInput, ensure_open
from vllm_stateful.sessions.admission import check_growth
from vllm_stateful.sessions.chat_render import continuation
from vllm_stateful.sessions.store import Session, SessionError

logger = logging.getLogger(__name__)

# Longest an ingest batch waits for in-flight queries before it runs anyway.
QUERY_YIELD_MAX_S = 2.0


@dataclass
class AppendItem:
    seq: int
    acked_at: float
    estimated_tokens: int
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass
class _Queue:
    items: list[AppendItem] = field(default_factory=list)
    task: asyncio.Task | None = None


class Ingestor:
    def __init__(self, service: SessionService) -> None:
        self.service = service
        self._queues: dict[str, _Queue] = {}

    def append(
        self, session: Session, text: str | None, token_ids: list[int] | None, messages: list[dict[str, Any]] | None
    ) -> AppendItem:
        """Acknowledge one append (version+1) and schedule its ingestion."""
        ensure_open(session)
        bridge = self.service.bridge
        if token_ids is not None:
            estimate = len(token_ids)
        elif text is not None:
            estimate = len(bridge.encode(text, first=False))
        else:
            estimate = len(bridge.encode(bridge.render(messages or [], False), first=False))
        limit = self.service.config.max_ingest_queue_tokens
        if session.queued_tokens and session.queued_tokens + estimate > limit:
            raise SessionError(
                429,
                f"ingest queue of session '{session.id}' is full ({session.queued_tokens} tokens queued, "
                f"limit {limit}); retry after it drains",
                "ingest_queue_full",
                retry_after=max(1.0, session.queued_tokens / 2000),
            )
        total_after = session.context_tokens + session.queued_tokens + estimate
        if total_after + 1 >= bridge.max_model_len:
            raise SessionError(
                413,
                f"appending {estimate} tokens would take session '{session.id}' to {total_after} tokens, "
                f"over the model's context length of {bridge.max_model_len}; the session is unchanged",
                "context_length_exceeded",
            )
        assert self.service.budget is not None
        check_growth(self.service.budget, self.service.store.pinned_blocks(), session.pinned_blocks, total_after)
        session.acked_seq += 1
        session.version += 1
        session.queued_tokens += estimate
        item = AppendItem(session.acked_seq, time.monotonic(), estimate, text, token_ids, messages)
        queue = self._queues.setdefault(session.id, _Queue())
        queue.items.append(item)
        if queue.task is None or queue.task.done():
            queue.task = asyncio.create_task(self._drain(session, queue))
        self.service.metrics.ingest_queued.inc(estimate)
        session.touch()
        return item

    async def _drain(self, session: Session, queue: _Queue) -> None:
        while queue.items and session.state != "closed":
            await self.service.yield_to_queries(QUERY_YIELD_MAX_S)
            async with session.write_lock:
                if session.state == "closed":
                    break  # closed while we waited; close() woke every waiter
                # taken under the lock: whatever queued while a turn ran becomes one prefill
                batch, queue.items = queue.items, []
                turn_input = self._coalesce(session, batch)
                try:
                    self.service.metrics.ingest_batches.inc()
                    await self.service.ingest_now(session, turn_input)
                except Exception as exc:  # acknowledged data must not vanish silently
                    logger.exception("ingest into session %s failed", session.id)
                    session.state, session.error = "failed", str(exc)
            estimate = sum(i.estimated_tokens for i in batch)
            session.queued_tokens -= estimate
            self.service.metrics.ingest_queued.dec(estimate)
            self.service.metrics.ingest_lag.set(time.monotonic() - batch[0].acked_at)
            async with session.ingest_cond:
                session.ingested_seq = batch[-1].seq
                session.ingest_cond.notify_all()
        if session.state == "closed":
            self._queues.pop(session.id, None)

    def _coalesce(self, session: Session, batch: list[AppendItem]) -> TurnInput:
        """One TurnInput equal to applying ``batch`` in order."""
        bridge = self.service.bridge
        ids: list[int] = []
        messages = list(session.messages)
        new_messages: list[dict[str, Any]] = []
        pending = session.pending_chat_text
        for item in batch:
            first = not session.token_ids and not ids
            if item.messages is not None:
                text = pending + continuation(bridge.render, messages, item.messages, False)
                messages += item.messages
                new_messages += item.messages
                ids += bridge.encode(text, first)
            elif item.text is not None:
                ids += bridge.encode(pending + item.text, first)
            else:
                ids += (bridge.encode(pending, first) if pending else []) + list(item.token_ids or [])
            pending = ""
        return TurnInput(ids, new_messages, is_chat=bool(new_messages) or bool(session.pending_chat_text))
