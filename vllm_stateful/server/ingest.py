"""The data plane: non-blocking appends, ingested in the background in order.

Contract:
* ``append`` acknowledges with the session's new version only after the
  append is validated (tokenized or rendered off the event loop) and its
  tokens are reserved in the ledger, including what a turn already in flight
  may add. An acknowledged append therefore cannot fail on context, quota or
  budget later; it is ingested by one background task per session
  incarnation, in acknowledgement order, coalescing whatever has queued up.
* The queue lives on the session incarnation: an append to a new session
  under a reused id can never land in, or be drained by, the old one.
* The queue is bounded in tokens (``max_ingest_queue_tokens``), the first
  append included: beyond it 429 + Retry-After, one append larger than it 413.
* If ingestion still fails (the engine is gone, a template error), the
  session becomes ``failed``, its waiters are released with that error (409),
  and the drain task survives to report it; nothing fails silently.
* Read-your-writes: ``Session.acked_seq``/``ingested_seq`` let a later request
  wait (bounded) for exactly the appends acknowledged before it.
* Priority is the engine's: ingestion requests carry the ingestion work
  class, so the scheduler runs session queries and turns first and gives
  ingestion a minimum share (``engine/work_classes.py``); nothing here waits
  for other sessions' queries.

One-way boundary: the ingestor asks the service for one operation
(``SessionService.ingest``); the service never calls back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from vllm_stateful.server.service import SessionService, ensure_open
from vllm_stateful.server.turn_types import TurnInput
from vllm_stateful.sessions.admission import Reservation
from vllm_stateful.sessions.store import Session, SessionError

logger = logging.getLogger(__name__)

# A batch the engine aborted (pause, cache reset) is retried after this backoff (doubling).
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0
# cell_budget_exceeded: a spilled session is charged again for its history when ingestion resumes
RETRYABLE = ("engine_aborted", "engine_unavailable", "cell_budget_exceeded")
ACKED_UNIX_KEY = "acked_unix"  # a saved append's acknowledgement time (wall clock)


def refuse_if_exclusive(session: Session) -> None:
    """The session is being filled with its creation content, or a fork, rewind or export is reading
    or rewriting it: 409, nothing changed."""
    if session.exclusive:
        raise SessionError(
            409,
            f"session '{session.id}' is being created, forked, rewound or exported; retry",
            "session_busy",
            retry_after=1.0,
        )


@dataclass
class AppendItem:
    seq: int
    version: int  # the session version acknowledged for it
    acked_at: float  # when it was acknowledged: this process's monotonic clock
    reservation: Reservation
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    acked_unix: float = 0.0  # the same moment on the wall clock (saved: a restart keeps the append's age)

    @property
    def reserved_tokens(self) -> int:
        return self.reservation.tokens

    def body(self) -> dict[str, Any]:
        """The append as saved in the state dir (re-queued from it after a restart)."""
        known = math.isfinite(self.acked_unix)  # else re-queued from a body that did not say (older release)
        head = {"version": self.version, **({ACKED_UNIX_KEY: self.acked_unix} if known else {})}
        if self.messages is not None:
            return {**head, "messages": self.messages}
        if self.text is not None:
            return {**head, "text": self.text}
        return {**head, "token_ids": list(self.token_ids or [])}


def next_batch(
    queued: list[AppendItem], needs: list[int], may_stop_short: bool = True
) -> tuple[list[AppendItem], list[AppendItem]]:
    """(the next batch, what stays queued): the whole queue, coalesced into one prefill, unless a
    request waits for an append in it (``needs``: the last append each waiter needs) and
    ``may_stop_short``: then the queue up to the last append any waiter needs, so no waiter also
    waits for appends queued after that. The drain never stops two batches short in a row: with
    bounded-staleness queries arriving during every batch, each would stop short again and keep
    ingestion about that bound behind the feed, and every such query waiting for a batch."""
    need = max(needs, default=0)
    cut = sum(1 for item in queued if item.seq <= need) if may_stop_short else 0  # queue in seq order
    return (queued[:cut], queued[cut:]) if cut else (queued, [])


def settled_version(queued: list[AppendItem]) -> int | None:
    """The newest version all of whose changes are in the session once the batch before ``queued``
    (the appends still queued) is applied: the one below the oldest queued append (appends are
    ingested in order; a turn takes its version when it commits, under the write lock the batch
    holds, so every turn below it is in); None: nothing is queued, so the session's current one."""
    return queued[0].version - 1 if queued else None


def acked_at_from(acked_unix: float, now: float, now_unix: float) -> float:
    """The monotonic time of an acknowledgement the wall clock dated ``acked_unix`` (never later
    than now; ``-inf``: unknown, so as old as can be)."""
    return now - max(0.0, now_unix - acked_unix)


class Ingestor:
    def __init__(self, service: SessionService) -> None:
        self.service = service

    async def append(
        self, session: Session, text: str | None, token_ids: list[int] | None, messages: list[dict[str, Any]] | None
    ) -> AppendItem:
        """Acknowledge one append (version+1, saved to the state dir) and schedule its ingestion;
        refusals change nothing."""
        service, bridge = self.service, self.service.bridge
        assert service.ledger is not None
        ensure_open(session)
        refuse_if_exclusive(session)
        if text is not None or messages is not None:
            chars = len(text) if text is not None else sum(len(str(m.get("content", ""))) for m in messages or [])
            lower_bound = bridge.min_tokens_of(chars)
            self._check_queue(session, lower_bound)
            # 413 before tokenizing (with offload the budget is freed by spilling, so not checked here)
            service.ledger.check(session.key, lower_bound, 1, "this append", budget=service.spiller is None)
        estimate = await self._estimate(session, text, token_ids, messages)
        ensure_open(session)  # it may have closed while we tokenized
        refuse_if_exclusive(session)
        self._check_queue(session, estimate)
        reservation = await service.admit(session, estimate, context_extra=1, what="this append")
        if not session.is_open or session.exclusive:  # changed while others were spilled to make room
            service.ledger.cancel(reservation)
            ensure_open(session)
            refuse_if_exclusive(session)
        item = self._enqueue(session, reservation, text, token_ids, messages)
        session.touch()
        await service.durable.append(session, item.seq, item.body())
        return item

    def _enqueue(
        self,
        session: Session,
        reservation: Reservation,
        text,
        token_ids,
        messages,
        version: int | None = None,
        acked_unix: float | None = None,
    ) -> AppendItem:
        """Queue one append: a new version, or ``version`` acknowledged at ``acked_unix`` (an append
        acknowledged before a restart; ``-inf``: when is unknown, so as old as can be)."""
        session.acked_seq += 1
        if version is None:
            session.version += 1
        session.queued_tokens += reservation.tokens
        label = session.version if version is None else version
        now, now_unix = time.monotonic(), time.time()
        acked_unix = now_unix if acked_unix is None else acked_unix
        acked_at = acked_at_from(acked_unix, now, now_unix)
        item = AppendItem(session.acked_seq, label, acked_at, reservation, text, token_ids, messages, acked_unix)
        session.pending_appends.append(item)
        session.uningested_acks.append((item.seq, item.acked_at))
        if session.ingest_task is None or session.ingest_task.done():
            session.ingest_task = asyncio.get_running_loop().create_task(self._drain(session))
        self.service.metrics.ingest_queued.inc(reservation.tokens)
        return item

    async def requeue_estimates(self, session: Session, bodies: list[dict[str, Any]]) -> list[int]:
        """Tokens to reserve for each append acknowledged before a restart (saved, not yet ingested)."""
        out = []
        for body in bodies:
            out.append(await self._estimate(session, body.get("text"), body.get("token_ids"), body.get("messages")))
        return out

    def requeue(self, session: Session, bodies: list[dict[str, Any]], estimates: list[int]) -> None:
        """Queue those appends again, in order, all at once (no await: no request sees part of the
        queue, and no new append lands between them). They were admitted then, so they are reserved
        without checks; versions and acknowledgement times are kept."""
        ledger = self.service.ledger
        assert ledger is not None
        for body, estimate in zip(bodies, estimates, strict=True):
            reservation = ledger.reserve(session.key, estimate, what="a restored append", force=True)
            acked_unix = float(body.get(ACKED_UNIX_KEY, -math.inf))  # saved by an older release: unknown
            version = int(body.get("version", session.version))
            text, token_ids, messages = body.get("text"), body.get("token_ids"), body.get("messages")
            self._enqueue(session, reservation, text, token_ids, messages, version, acked_unix)

    def _check_queue(self, session: Session, tokens: int) -> None:
        limit = self.service.config.max_ingest_queue_tokens
        if tokens > limit:
            raise SessionError(
                413,
                f"one append of {tokens} tokens is larger than the ingest queue ({limit} tokens); split it",
                "append_too_large",
            )
        if session.queued_tokens + tokens > limit:
            raise SessionError(
                429,
                f"ingest queue of session '{session.id}' is full ({session.queued_tokens} tokens queued, "
                f"limit {limit}); retry after it drains",
                "ingest_queue_full",
                retry_after=max(1.0, session.queued_tokens / 2000),
            )

    async def _estimate(
        self, session: Session, text: str | None, token_ids: list[int] | None, messages: list[dict[str, Any]] | None
    ) -> int:
        """Tokens to reserve: exact for token ids and plain text, an upper bound
        (the template's whole reply closing added) where a chat turn may commit first."""
        bridge = self.service.bridge
        previous = list(session.messages)

        def count() -> tuple[int, int]:
            margin = len(bridge.encode(bridge.closing.text, False))
            if token_ids is not None:
                return len(token_ids), margin
            if text is not None:
                return len(bridge.encode(text, False)) + 1, margin  # +1: BOS on a first append
            return len(bridge.encode(bridge.continuation(previous, messages or [], False), False)) + 1, margin

        tokens, margin = await bridge.off_loop(count)
        # decided after the await: a chat turn that started meanwhile may commit first and
        # leave its reply closing to be prepended to this append
        chatty = bool(session.messages) or session.turn_in_flight or bool(session.pending_chat_text)
        return tokens + (margin if chatty else 0)

    async def _drain(self, session: Session) -> None:
        # No await may follow the loop: ``append`` relies on ``ingest_task.done()``
        # becoming true in the same step that finds the queue empty.
        backoff, stopped_short = 0.0, False
        while session.pending_appends and session.is_open:
            if backoff:
                await asyncio.sleep(backoff)
            async with session.write_lock:
                if not session.is_open:
                    break  # closed or failed while we waited; waiters were woken
                batch, rest = next_batch(session.pending_appends, session.ingest_needs, not stopped_short)
                session.pending_appends, stopped_short = rest, bool(rest)
                consumed = await self._ingest_batch(session, batch)
            backoff = 0.0 if consumed else min(RETRY_MAX_S, max(RETRY_FIRST_S, 2 * backoff))

    async def _ingest_batch(self, session: Session, batch: list[AppendItem]) -> bool:
        """Ingest ``batch``: True once it is ingested or the session failed; False when the engine
        aborted it (paused, reset) and it went back to the head of the queue, reservations kept."""
        service = self.service
        ingested = False
        try:
            previous, pending, empty = list(session.messages), session.pending_chat_text, not session.token_ids
            turn_input = await service.bridge.off_loop(self._coalesce, previous, pending, empty, batch)
            service.metrics.ingest_batches.inc()
            version = settled_version(session.pending_appends)
            reservations = [i.reservation for i in batch]
            await service.ingest(session, turn_input, reservations, version, ingested_seq=batch[-1].seq)
            ingested = True
        except asyncio.CancelledError:
            self._finish(session, batch, ingested=False)
            raise
        except Exception as exc:  # acknowledged data must not vanish silently
            if session.is_open and isinstance(exc, SessionError) and exc.code in RETRYABLE:
                logger.warning("vllm-stateful: ingest into session %s deferred: %s", session.id, exc.message)
                session.pending_appends = batch + session.pending_appends
                return False
            if session.is_open:
                logger.exception("vllm-stateful: ingest into session %s failed", session.id)
                session.state = "failed"
                session.error = exc.message if isinstance(exc, SessionError) else f"{type(exc).__name__}: {exc}"
                session.events.close("failed", {"reason": "ingest_failed", "error": session.error})
                service.metrics.ingest_failures.inc()
        self._finish(session, batch, ingested)
        async with session.ingest_cond:
            session.ingest_cond.notify_all()
        return True

    def _finish(self, session: Session, batch: list[AppendItem], ingested: bool) -> None:
        """The batch leaves the queue: its reservations are settled (by ``ingest``) or returned."""
        service = self.service
        if not ingested and service.ledger is not None:
            for item in batch:
                service.ledger.cancel(item.reservation)
        reserved = sum(i.reserved_tokens for i in batch)
        session.queued_tokens -= reserved
        service.metrics.ingest_queued.dec(reserved)
        if math.isfinite(batch[0].acked_at):  # else re-queued with no saved time
            service.metrics.ingest_lag.set(time.monotonic() - batch[0].acked_at)
        session.appends_ingested(batch[-1].seq)  # already done by ``ingest`` where it applied them

    def _coalesce(
        self, messages: list[dict[str, Any]], pending: str, empty: bool, batch: list[AppendItem]
    ) -> TurnInput:
        """One TurnInput equal to applying ``batch`` in order (runs in the tokenizer thread)."""
        bridge = self.service.bridge
        ids: list[int] = []
        new_messages: list[dict[str, Any]] = []
        chat = bool(pending)
        boundaries = []
        for item in batch:
            first = empty and not ids
            if item.messages is not None:
                text = pending + bridge.continuation(messages, item.messages, False)
                messages = messages + item.messages
                new_messages += item.messages
                ids += bridge.encode(text, first)
                chat = True
            elif item.text is not None:
                ids += bridge.encode(pending + item.text, first)
            else:
                ids += (bridge.encode(pending, first) if pending else []) + list(item.token_ids or [])
            pending = ""
            boundaries.append((item.version, len(ids), len(new_messages)))
        return TurnInput(ids, new_messages, is_chat=chat, boundaries=boundaries)
