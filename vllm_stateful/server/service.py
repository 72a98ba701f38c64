"""Session operations over the engine: turns, queries, prefill-only ingestion
and close. HTTP-free: routes translate its results and SessionErrors.

Guarantees:
* A turn commits (tokens, messages, version+1) only when generation finished
  normally, and atomically: the engine's pin is synced first, the API state
  changes only after that succeeded. Any failure, abort or disconnect leaves
  the session exactly as it was (tokens, version, pinned KV, reservations).
* Growth is reserved before work starts (``CellLedger``): a request that
  starts cannot later fail on budget, quota or context.
* At most one committing turn per session is in flight (else 409); turns and
  ingestion batches of one session run one at a time, in arrival order.
* Queries (commit=False) read a snapshot and never change the session; one
  cut short by a close ends with the same 404 a committing turn gets.
* Every wait (earlier appends, the session's write lock) is bounded by
  ``ingest_wait_timeout_s``; past it the request is a 503 and changes nothing.
* A session that only existed because a request named it (created on first
  use) is removed again if that request commits nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.request_tags import make_extra_args
from vllm_stateful.engine.work_classes import CLASS_KEY, FLASH, INGEST
from vllm_stateful.server.bridge import EngineBridge
from vllm_stateful.server.durability import Change, Durability
from vllm_stateful.server.metrics import SessionMetrics
from vllm_stateful.server.placement import least_loaded
from vllm_stateful.server.session_kv import SessionKV, finish_then_cancel, survive_cancellation
from vllm_stateful.server.spill import Spiller
from vllm_stateful.server.turn_types import TurnInput, TurnResult
from vllm_stateful.sessions.admission import Budget, Reservation
from vllm_stateful.sessions.consistency import READ_ALL, ReadConsistency, staleness_ms
from vllm_stateful.sessions.durable import Checkpoint
from vllm_stateful.sessions.events import SessionEvents
from vllm_stateful.sessions.rank_ledgers import RankedLedgers
from vllm_stateful.sessions.store import PinView, Session, SessionError, SessionStore
from vllm_stateful.sessions.tenants import Tenancy

logger = logging.getLogger(__name__)

# The event that ends a session's stream, by close reason (other reasons: "closed").
LIFECYCLE_EVENTS = {"expired": "expired", "failed": "failed"}
BuildInput = Callable[[Session], Awaitable[TurnInput]]
T = TypeVar("T")
MakeParams = Callable[[int], SamplingParams]


class SessionService:
    def __init__(self, bridge: EngineBridge, config: StatefulConfig, metrics: SessionMetrics, tenancy: Tenancy):
        self.bridge = bridge
        self.config = config
        self.metrics = metrics
        self.tenancy = tenancy
        self.kv = SessionKV(bridge, tenancy, references=config.prefix_references)
        self.store = SessionStore(
            config.default_ttl_s,
            config.max_sessions,
            config.tenant_session_limit,
            lambda: SessionEvents(config.event_replay, config.event_buffer, config.max_event_subscribers_per_session),
            lambda live: least_loaded(live, bridge.dp_size),
        )
        self.budget: Budget | None = None
        self.ledger: RankedLedgers | None = None
        self.kv_epochs: list[int] = []  # per data-parallel rank
        self.durable = Durability(None)  # set by the plugin before start() when state_dir is on
        self.spiller: Spiller | None = None  # admission "offload"
        # Set by the flash-query runner: told of every committed change and close; answers cache hits.
        self.on_commit: Callable[[Session], None] | None = None
        self.on_close: Callable[[Session], None] | None = None
        self.cached_answer: Callable[[TurnResult, list[int], SamplingParams], bool] | None = None

    async def start(self) -> None:
        """Attach to the engine (hand it the tag secret) and size the budget; raises if unsupported."""
        infos = await self.bridge.call_all("handshake", secret=self.tenancy.secret.hex())
        info = min(infos, key=lambda i: i["num_blocks"])  # ranks run one config; the smallest pool bounds
        self.budget = Budget.for_engine(
            info["num_blocks"],
            info["block_size"],
            self.bridge.max_model_len,
            self.config.cell_budget,
            self.config.session_quota,
        )
        self.ledger = RankedLedgers(self.budget, len(infos), self._rank_of_key)
        self.kv_epochs = [i["kv_epoch"] for i in infos]
        if self.config.admission == "offload":
            self.spiller = Spiller(self, self.bridge.has_offload_tier)

    def _rank_of_key(self, key: str) -> int | None:
        session = self.store.by_key(key)
        return None if session is None else session.data_parallel_rank

    async def admit(
        self,
        session: Session,
        tokens: int,
        context_extra: int = 0,
        what: str = "this request",
        known: list[int] | None = None,
    ) -> Reservation:
        """Reserve ``tokens`` for ``session`` (see ``CellLedger.reserve``). Over the cell budget,
        with ``admission: "offload"``, idle sessions are spilled (least recently used first)
        until it fits; 429 only when none is left to spill."""
        ledger = self.ledger
        assert ledger is not None
        return await self._spilling(
            session, lambda: ledger.reserve(session.key, tokens, context_extra, what, known, session.tenant)
        )

    async def _spilling(self, session: Session, attempt: Callable[[], T]) -> T:
        """``attempt()``; while it is over the cell budget and ``admission: "offload"`` can spill an
        idle session (least recently used first, never ``session``), spill one and try again."""
        while True:
            try:
                return attempt()
            except SessionError as err:
                if err.code != "cell_budget_exceeded" or self.spiller is None:
                    raise
                if not await self.spiller.spill_one(exclude=session.key, rank=session.data_parallel_rank):
                    raise
                ensure_open(session)

    def recharge_tokens(self, session: Session) -> int:
        """History tokens a spilled session must be charged for again before its KV is rebuilt."""
        assert self.ledger is not None
        return max(0, len(session.token_ids) - self.ledger.committed_tokens(session.key))

    @property
    def ready(self) -> bool:
        return self.ledger is not None

    def describe(self, session: Session) -> dict[str, Any]:
        """The session object of the API, with ``shared_blocks``: how many of its pinned blocks
        other sessions of its tenant hold too (charged once to the budget)."""
        shared = 0 if self.ledger is None else self.ledger.shared_blocks(session.key)
        return {**session.to_public(), "shared_blocks": min(shared, session.pinned_blocks)}

    # --- input -----------------------------------------------------------------

    async def chat_input(self, session: Session, messages: list[dict[str, Any]], add_generation_prompt: bool):
        """Tokens for ``messages`` continuing the session's conversation (rendered off the event loop),
        over a snapshot of the session taken now."""
        self.check_text_fits(session, sum(len(str(m.get("content", ""))) for m in messages))
        history, previous, pending = list(session.token_ids), list(session.messages), session.pending_chat_text
        pin = session.pin_view()

        def build() -> TurnInput:
            text = pending + self.bridge.continuation(previous, messages, add_generation_prompt)
            return TurnInput(self.bridge.encode(text, not history), list(messages), True, history, pin)

        return await self.bridge.off_loop(build)

    async def text_input(self, session: Session, text: str) -> TurnInput:
        self.check_text_fits(session, len(text))
        history, pin = list(session.token_ids), session.pin_view()
        tokens = await self.bridge.off_loop(self.bridge.encode, text, not history)
        return TurnInput(tokens, history=history, pin=pin)

    def check_text_fits(self, session: Session, chars: int) -> None:
        """413 without tokenizing when ``chars`` characters of text cannot fit the context."""
        if session.context_tokens + self.bridge.min_tokens_of(chars) > self.bridge.max_model_len:
            raise SessionError(
                413,
                f"{chars} characters of text are at least {self.bridge.min_tokens_of(chars)} tokens, beyond what "
                f"the session can hold in the model's context length of {self.bridge.max_model_len}",
                "context_length_exceeded",
            )

    # --- turns and queries -------------------------------------------------------

    def open_session(self, tenant: str, session_id: str, commit: bool) -> tuple[Session, bool]:
        """The caller's session; a committing request creates it on first use."""
        if commit and not self.store.contains(tenant, session_id):
            return self.store.create(tenant, session_id), True
        return self.store.get(tenant, session_id), False

    async def run_turn(
        self,
        session: Session,
        created: bool,
        build_input: BuildInput,
        make_params: MakeParams,
        max_tokens: int | None,
        commit: bool,
        stream: bool,
        priority: int = 0,
        session_id: str | None = None,
        flash: bool = False,
        consistency: ReadConsistency = READ_ALL,
    ) -> AsyncIterator[tuple[TurnResult, RequestOutput | None]]:
        """Run one request on the session, yielding (result, delta) per engine output.

        ``build_input(session)`` runs once the session is ready (earlier appends
        ingested, earlier turn committed); ``make_params(max_tokens)`` builds
        vLLM's sampling params once the final ``max_tokens`` is known. The last
        yielded result has ``finished`` set and, with ``commit``, is committed.
        Refusals raise SessionError before the first yield.

        A read-only query whose answer a flash query already holds for this
        version is answered from that cache (one result, no delta, no engine
        request). ``flash``: a background flash evaluation -- it reads what is
        committed now (no read-your-writes wait), runs in the engine's flash
        class (only on spare capacity), and is not client use of the session.
        ``consistency`` (read-only queries; see ``sessions/consistency.py``): without
        read-your-writes, the wait is for the appends it names (none, or those older than its
        bound); the answer reads what is ingested then and says how many versions it is behind
        (``versions_behind``, and ``staleness_ms``: how old the oldest of them is). A committing
        request always waits for every acknowledged append.
        """
        assert self.ledger is not None
        user_query = not commit and not flash  # a client's read-only query
        flagged = lock_held = committed = False
        reservation: Reservation | None = None
        try:
            ensure_open(session)
            if commit and session.turn_in_flight:
                raise SessionError(
                    409, f"session '{session.id}' is busy with another committing request", "session_busy"
                )
            if commit:
                session.turn_in_flight = flagged = True
            if not flash:
                pending, now = session.uningested_acks, time.monotonic()
                seq = session.acked_seq if commit else consistency.seq_to_see(session.acked_seq, pending, now)
                if seq is not None:
                    await self.wait_ingested(session, seq)
            if commit:
                await self._acquire(session)
                lock_held = True
                ensure_open(session)
            # build_input snapshots the session before its first await
            read_version = session.version if commit else session.committed_version
            read_seq = session.commit_seq
            stale = None  # (versions_behind, staleness_ms): only a query that may read behind reports them
            if user_query and not consistency.read_your_writes:
                behind = session.version - read_version
                stale = behind, staleness_ms(behind, session.uningested_acks, time.monotonic())
            turn_input = await build_input(session)
            ensure_open(session)  # closed while the input was built: nothing may start
            history = session.token_ids if turn_input.history is None else turn_input.history
            pin = session.pin_view() if turn_input.history is None else turn_input.pin
            prompt = history + turn_input.token_ids
            run_max = self._run_max(session, len(prompt), len(turn_input.token_ids), max_tokens, commit)
            if commit:
                await self.recharge(session)  # a spilled session is charged again for the history it re-pins
                reservation = await self.admit(session, len(turn_input.token_ids) + run_max, known=prompt)
                ensure_open(session)
            params = make_params(run_max)
            params.extra_args = {
                **(params.extra_args or {}),
                **make_extra_args(self.tenancy.secret, session.key, commit),
                **({CLASS_KEY: FLASH} if flash else {}),
            }
            params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
            read = {"version": read_version, "read_seq": read_seq, "read_tokens": len(history)}
            result = TurnResult(session, len(prompt), session.kv_tokens, **read)
            if user_query:
                result.flash_hit = False
                if stale is not None:  # acknowledged, not yet ingested, when it read
                    result.versions_behind, result.staleness_ms = stale
            if user_query and not stream and self.cached_answer is not None:
                if self.cached_answer(result, turn_input.token_ids, params):
                    yield result, None
                    return
            started = time.monotonic()
            # aclosing: the engine request is aborted before the rollback below is sent
            generation = self.kv.generate(prompt, params, result, priority, session_id, background=flash, pin=pin)
            async with aclosing(generation) as outputs:
                async for delta in outputs:
                    if result.finished:
                        self._check_not_aborted(session, result)
                        if commit:
                            await self._commit(session, turn_input, prompt, result, params, reservation)
                            committed = True
                    yield result, delta
            if user_query:
                self.metrics.query_latency.observe(time.monotonic() - started)
        finally:
            if reservation is not None and not committed:
                self.ledger.cancel(reservation)
            await survive_cancellation(self._end_turn(session, flagged, lock_held, committed, created, not flash))

    def _run_max(self, session: Session, prompt_len: int, new_len: int, max_tokens: int | None, commit: bool) -> int:
        """The max_tokens to run with; 413 if the prompt alone does not fit the context."""
        assert self.ledger is not None
        limit = self.bridge.max_model_len
        if prompt_len >= limit:
            raise SessionError(
                413,
                f"session '{session.id}' would hold {prompt_len} prompt tokens, over the model's context length "
                f"of {limit}; the session is unchanged",
                "context_length_exceeded",
            )
        if max_tokens is not None:
            if not commit and prompt_len + max_tokens > limit:
                raise SessionError(
                    413,
                    f"{prompt_len} prompt tokens + {max_tokens} to generate exceed the model's context length "
                    f"of {limit}",
                    "context_length_exceeded",
                )
            return max_tokens
        if not commit:
            return limit - prompt_len
        # unbounded generation stops where the context, the quota or the budget would
        room = self.ledger.room(session.key, ignore_budget=self.spiller is not None)  # offload: spill for room
        return max(1, min(limit - prompt_len, room - new_len))

    def _check_not_aborted(self, session: Session, result: TurnResult) -> None:
        """A request the engine aborted or failed commits nothing: 404 if the session closed, else 503."""
        if result.finish_reason not in ("abort", "error"):
            return
        ensure_open(session)
        raise SessionError(
            503, "the engine aborted the request (paused, reset or shutting down); retry", "engine_aborted", 1.0
        )

    async def _acquire(self, session: Session) -> None:
        try:
            await asyncio.wait_for(session.write_lock.acquire(), self.config.ingest_wait_timeout_s)
        except asyncio.TimeoutError:
            raise _busy_timeout(session) from None

    async def wait_ingested(self, session: Session, seq: int, inherit: bool = True) -> None:
        """Read-your-writes: wait (bounded) until appends up to ``seq`` are ingested.

        ``inherit``: the waiter is a turn or query: ingestion batches of the session sent to the
        engine while it waits run in its class (an append's own ``wait`` keeps the ingestion class).
        The next ingestion batch stops at the last append a waiter needs (``Ingestor``), so a wait
        for older appends does not also wait for younger ones queued behind them.
        Raises 404 if the session closes meanwhile, 409 if ingestion failed, 503 with Retry-After
        past ``ingest_wait_timeout_s``.
        """

        def done() -> bool:
            return session.ingested_seq >= seq or not session.is_open

        if not done():
            session.ingest_waiters += int(inherit)
            session.ingest_needs.append(seq)
            try:
                async with session.ingest_cond:
                    await asyncio.wait_for(session.ingest_cond.wait_for(done), self.config.ingest_wait_timeout_s)
            except asyncio.TimeoutError:
                raise _busy_timeout(session) from None
            finally:
                session.ingest_waiters -= int(inherit)
                session.ingest_needs.remove(seq)
        ensure_open(session)

    async def _end_turn(
        self, session: Session, flagged: bool, lock_held: bool, committed: bool, created: bool, used: bool = True
    ):
        if lock_held:
            if not committed:
                await self.kv.rollback(session)
            session.write_lock.release()
        if flagged:
            session.turn_in_flight = False
        if used:
            session.touch()
        if created and not committed and session.version == 0 and session.acked_seq == 0 and session.is_open:
            await self.close(session, reason="abandoned")

    async def _commit(
        self,
        session: Session,
        turn_input: TurnInput,
        prompt: list[int],
        result: TurnResult,
        params: SamplingParams,
        reservation: Reservation | None,
    ) -> None:
        """Sync the engine's pin, save the change, then apply it (no await after the save)."""
        ensure_open(session)
        kept, extra, pending = await self.bridge.off_loop(
            self.kv.kept_output, result, params.skip_special_tokens, turn_input.is_chat, session.pending_chat_text
        )
        history = prompt + kept + extra
        info = await self.kv.sync(session, len(prompt) + len(kept))
        ensure_open(session)
        messages = session.messages
        if turn_input.is_chat:
            messages = messages + turn_input.messages + [{"role": "assistant", "content": result.text}]
        else:
            pending = session.pending_chat_text
        # the version is taken now: appends acknowledged while the change is saved come after it
        session.version += 1
        complete = session.acked_seq == session.ingested_seq
        committed_version = max(session.committed_version, session.version) if complete else session.committed_version
        # a rewind point only where every earlier acknowledged change is in the history
        version = session.version
        change = Change(history, messages, pending, committed_version, version)
        points = [Checkpoint(version, len(history), len(messages), pending)] if complete else []

        async def save_and_apply() -> None:
            await self.durable.commit(session, change, points)  # on failure _end_turn trims the pin back
            ensure_open(session)
            self._apply(session, change, points)
            result.version = version
            # the engine computed KV for all but the last generated token
            self.kv.apply(session, info, len(prompt) + min(len(kept), len(result.output_token_ids) - 1))
            note_restored(session, result)
            if reservation is not None and self.ledger is not None:
                self.ledger.settle(reservation, len(history), history, session.pinned_tokens)
            self._announce(session)

        # once the save has started, a disconnect cannot stop it half-way: saved means applied
        await finish_then_cancel(save_and_apply())
        self.metrics.turns.inc()
        self.metrics.recomputed.inc(result.recomputed_tokens)
        self.metrics.reused.inc(result.cached_tokens)
        self.metrics.refresh(self)

    # --- prefill-only ingestion (session creation with content, appends) ---------

    async def ingest(
        self,
        session: Session,
        turn_input: TurnInput,
        reservations: list[Reservation],
        version: int | None = None,
        ingested_seq: int | None = None,
    ) -> None:
        """Prefill ``turn_input`` into the session and commit it (no visible output).

        Caller holds ``session.write_lock`` and has reserved the tokens.
        ``version``: the version that makes (default: the current one); the caller guarantees
        that every change up to it is in the session afterwards, so it becomes the committed one
        (what a read-only query that does not wait reads). vLLM always
        samples one token; it is discarded and never enters the session.
        ``ingested_seq``: the last append this makes durable (its saved queue entries go with
        the same write). On success the reservations are settled; on failure nothing changes.
        """
        assert self.ledger is not None
        ensure_open(session)
        label = session.version if version is None else version
        committed_version = max(session.committed_version, label)
        if not turn_input.token_ids:
            change = Change(session.token_ids, session.messages, session.pending_chat_text, committed_version, label)

            async def save_and_apply_nothing() -> None:
                await self.durable.commit(session, change, [], ingested_seq)
                ensure_open(session)
                self._apply(session, change, [], ingested_seq)
                for res in reservations:
                    self.ledger.settle(res, session.context_tokens, session.token_ids, session.pinned_tokens)
                self._announce(session)

            await finish_then_cancel(save_and_apply_nothing())
            return
        await self.recharge(session)  # a spilled session is charged again for the history it re-pins
        prompt, pin = session.token_ids + turn_input.token_ids, session.pin_view()
        result = TurnResult(session, len(prompt), session.kv_tokens)
        committed = False
        try:
            # the engine's ingestion class (after queries and plain traffic, with a minimum share),
            # unless a request is waiting for this data: then its class (priority inheritance)
            await self.prefill(session, prompt, result, ingest_class=not session.ingest_waiters, pin=pin)
            self._check_not_aborted(session, result)
            ensure_open(session)
            info = await self.kv.sync(session, len(prompt))
            ensure_open(session)
            chat = turn_input.is_chat
            messages = session.messages + turn_input.messages if chat else session.messages
            base, base_messages = len(session.token_ids), len(session.messages)
            points = [
                Checkpoint(v, base + n, base_messages + m, "")
                for v, n, m in turn_input.boundaries
                if v > session.newest_applied  # else a later change (a turn) is in the history before it
            ]
            applied = max([v for v, _, _ in turn_input.boundaries] + [label])
            pending = "" if chat else session.pending_chat_text
            change = Change(prompt, messages, pending, committed_version, applied)

            async def save_and_apply() -> None:
                await self.durable.commit(session, change, points, ingested_seq)
                ensure_open(session)
                self._apply(session, change, points, ingested_seq)
                self.kv.apply(session, info, len(prompt))
                note_restored(session, result)
                for res in reservations:
                    self.ledger.settle(res, len(prompt), prompt, session.pinned_tokens)
                self._announce(session)

            await finish_then_cancel(save_and_apply())
            committed = True
            self.metrics.ingested.inc(len(turn_input.token_ids))
        finally:
            if not committed:
                await survive_cancellation(self.kv.rollback(session))

    async def prefill(
        self,
        session: Session,
        prompt: list[int],
        result: TurnResult,
        ingest_class: bool,
        background: bool = False,
        pin: PinView | None = None,
    ) -> None:
        """Compute the KV of ``prompt`` on the session, filling ``result`` (vLLM samples one token; it
        is discarded). ``ingest_class``: in the engine's ingestion class, else in the session's own
        (query) class; ``background``: not client use of the session (see ``SessionKV.generate``)."""
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        work_class = {CLASS_KEY: INGEST} if ingest_class else {}
        params.extra_args = {**make_extra_args(self.tenancy.secret, session.key, True), **work_class}
        params.output_kind = RequestOutputKind.FINAL_ONLY
        async with aclosing(self.kv.generate(prompt, params, result, background=background, pin=pin)) as outputs:
            async for _ in outputs:
                pass

    async def recharge(self, session: Session) -> None:
        """Charge a session whose KV left the pool (spilled, or restored over budget) for its whole
        history again, before its KV is rebuilt; with ``admission: "offload"`` idle sessions are
        spilled to make room. 429 ``cell_budget_exceeded`` when it cannot fit."""
        ledger = self.ledger
        assert ledger is not None
        if self.recharge_tokens(session):
            await self._spilling(session, lambda: ledger.recharge(session.key, session.token_ids))

    def _apply(
        self, session: Session, change: Change, points: list[Checkpoint], ingested_seq: int | None = None
    ) -> None:
        """A saved change becomes the session's state (no await: nobody sees half of it), with the
        appends up to ``ingested_seq`` it holds no longer counted as not ingested."""
        if ingested_seq is not None:
            session.appends_ingested(ingested_seq)
        session.token_ids = change.token_ids
        session.messages = change.messages
        session.pending_chat_text = change.pending_chat_text
        session.committed_version = change.committed_version
        session.newest_applied = max(session.newest_applied, change.applied_version)
        session.commit_seq += 1
        for point in points:
            session.add_checkpoint(point, self.config.rewind_window)

    def _announce(self, session: Session) -> None:
        """Tell subscribers and flash queries of a change once it is saved and applied."""
        session.events.publish(
            "appended", {"version": session.committed_version, "context_tokens": session.context_tokens}
        )
        if self.on_commit is not None:
            self.on_commit(session)

    # --- close -----------------------------------------------------------------------

    async def close(self, session: Session, reason: str = "closed") -> dict[str, Any]:
        """Remove this incarnation and release every block it pins.

        In-flight work on it is aborted first and the release waits (bounded)
        for the session's write lock, so a finishing turn or ingestion cannot
        pin blocks for a session that no longer exists. Idempotent.
        """
        if not self.store.remove(session):
            return {"id": session.id, "object": "session.deleted", "deleted": True, "freed_blocks": 0}
        try:  # first await: before any write of a new incarnation; reported after the cleanup
            await self.durable.delete(session)
            not_deleted = None
        except SessionError as err:
            not_deleted = err
        if self.ledger is not None:
            self.ledger.forget(session.key)
        self.metrics.ingest_queued.dec(session.queued_tokens)
        for request_id in list(session.active_request_ids | session.background_request_ids):
            await self.bridge.abort(request_id)
        async with session.ingest_cond:
            session.ingest_cond.notify_all()
        freed = await self.kv.release_when_unlocked(session, self.config.ingest_wait_timeout_s)
        session.events.close(LIFECYCLE_EVENTS.get(reason, "closed"), {"reason": reason})
        if self.on_close is not None:
            self.on_close(session)
        self.metrics.closed.labels(reason=reason).inc()
        self.metrics.refresh(self)
        if not_deleted is not None:
            raise not_deleted
        return {"id": session.id, "object": "session.deleted", "deleted": True, "freed_blocks": freed}


def note_restored(session: Session, result: TurnResult) -> None:
    """A restored or imported session's KV came back with ``result``: say how, once."""
    if session.restored is not None and session.restored.get("kv") == "pending":
        recomputed = result.recomputed_tokens
        kv = "recomputed" if recomputed else "loaded"
        session.restored.update(kv=kv, recomputed_tokens=recomputed, loaded_tokens=result.cached_tokens)


def ensure_open(session: Session) -> None:
    """Raise 409 for a failed session and 404 for a closed one."""
    if session.state == "failed":
        raise SessionError(
            409,
            f"session '{session.id}' failed to ingest acknowledged data ({session.error}); delete it",
            "session_failed",
        )
    if session.state == "closed":
        raise SessionError(404, f"session '{session.id}' was closed", "session_not_found")


def _busy_timeout(session: Session) -> SessionError:
    return SessionError(
        503,
        f"session '{session.id}' is still ingesting earlier appends; retry (nothing was changed)",
        "session_backlog",
        retry_after=max(1.0, session.queued_tokens / 2000),
    )
