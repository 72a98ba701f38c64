"""Session operations over the engine: turns, queries, prefill-only ingestion,
close and expiry. HTTP-free: routes translate its results and SessionErrors.

Guarantees:
* A turn commits (tokens, messages, version+1) only when generation finished;
  any failure or disconnect leaves the session exactly as it was, and the
  engine's pinned KV is trimmed back to the committed history.
* At most one committing turn per session is in flight (else 409); turns and
  ingestion batches of one session run one at a time, in arrival order.
* Queries (commit=False) read a snapshot and never change the session.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.request_tags import make_extra_args
from vllm_stateful.server.bridge import EngineBridge
from vllm_stateful.server.metrics import SessionMetrics
from vllm_stateful.sessions.admission import Budget, check_growth
from vllm_stateful.sessions.chat_render import continuation
from vllm_stateful.sessions.store import Session, SessionError, SessionStore


@dataclass
class TurnInput:
    """What a request adds to its session."""

    token_ids: list[int]
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat only
    is_chat: bool = False


@dataclass
class TurnResult:
    """Filled in as the turn runs; final once ``finished``."""

    session: Session
    prompt_tokens: int  # every token the request attends to: session history + its new tokens
    kv_tokens_before: int
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cached_tokens: int = 0
    finished: bool = False

    @property
    def new_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def recomputed_tokens(self) -> int:
        return max(0, min(self.kv_tokens_before, self.prompt_tokens - 1) - self.cached_tokens)

    def session_field(self) -> dict[str, Any]:
        return {
            "id": self.session.id,
            "version": self.session.version,
            "context_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "recomputed_tokens": self.recomputed_tokens,
        }

    def usage(self) -> dict[str, Any]:
        n_out = len(self.output_token_ids)
        return {
            "prompt_tokens": self.new_tokens,
            "completion_tokens": n_out,
            "total_tokens": self.new_tokens + n_out,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class SessionService:
    def __init__(self, bridge: EngineBridge, config: StatefulConfig, metrics: SessionMetrics) -> None:
        self.bridge = bridge
        self.config = config
        self.metrics = metrics
        self.store = SessionStore(config.default_ttl_s)
        self.budget: Budget | None = None
        # Background ingestion yields to read-only queries (bounded), so a query's
        # decode steps are not batched with ingest prefills.
        self._queries_in_flight = 0
        self._queries_idle = asyncio.Event()
        self._queries_idle.set()

    async def start(self) -> None:
        info = await self.bridge.call("info")
        capacity = info["num_blocks"] * info["block_size"]
        self.budget = Budget(
            cell_budget_tokens=self.config.cell_budget or int(capacity * 0.9),
            session_quota_tokens=self.config.session_quota or self.bridge.max_model_len,
            block_size=info["block_size"],
        )

    # --- input -----------------------------------------------------------------

    def chat_input(self, session: Session, messages: list[dict[str, Any]], add_generation_prompt: bool) -> TurnInput:
        """Tokens for ``messages`` continuing the session's conversation."""
        text = session.pending_chat_text + continuation(
            self.bridge.render, session.messages, messages, add_generation_prompt
        )
        return TurnInput(self.bridge.encode(text, first=not session.token_ids), list(messages), True)

    def text_input(self, session: Session, text: str) -> TurnInput:
        return TurnInput(self.bridge.encode(text, first=not session.token_ids))

    # --- turns and queries -------------------------------------------------------

    def _check_fits(self, session: Session, prompt_len: int, max_tokens: int | None) -> int:
        """The max_tokens to run with; 413 if the session would exceed the context."""
        limit = self.bridge.max_model_len
        if prompt_len >= limit or (max_tokens is not None and prompt_len + max_tokens > limit):
            raise SessionError(
                413,
                f"session '{session.id}' would hold {prompt_len} prompt tokens"
                + (f" + {max_tokens} to generate" if max_tokens else "")
                + f", over the model's context length of {limit}; the session is unchanged",
                "context_length_exceeded",
            )
        return max_tokens if max_tokens is not None else limit - prompt_len

    async def wait_ingested(self, session: Session, seq: int) -> None:
        """Read-your-writes: wait until appends up to ``seq`` are ingested."""
        async with session.ingest_cond:
            await session.ingest_cond.wait_for(lambda: session.ingested_seq >= seq or session.state == "closed")
        if session.state == "closed":
            raise SessionError(404, f"session '{session.id}' was closed", "session_not_found")

    async def run_turn(
        self,
        session: Session,
        build_input,
        params: SamplingParams,
        max_tokens: int | None,
        commit: bool,
        stream: bool,
    ) -> AsyncIterator[tuple[TurnResult, RequestOutput | None]]:
        """Run one request on the session, yielding (result, delta) per engine output.

        ``build_input(session) -> TurnInput`` is called once the session is
        ready (earlier appends ingested, earlier turn committed). The last
        yielded result has ``finished`` set and, with ``commit``, is already
        committed. Raises SessionError before the first yield on refusal.
        """
        ensure_open(session)
        if commit and session.turn_in_flight:
            raise SessionError(409, f"session '{session.id}' is busy with another committing request", "session_busy")
        if commit:
            session.turn_in_flight = True
        lock_held = committed = query_counted = False
        try:
            await self.wait_ingested(session, session.acked_seq)
            if commit:
                await session.write_lock.acquire()
                lock_held = True
                ensure_open(session)  # closed while we waited: must not pin anything
            turn_input = build_input(session)
            history = list(session.token_ids)
            prompt = history + turn_input.token_ids
            run_max = self._check_fits(session, len(prompt), max_tokens)
            if commit:
                assert self.budget is not None
                if max_tokens is None:  # unbounded generation stops at the session quota, as at max_model_len
                    run_max = max(1, min(run_max, self.budget.session_quota_tokens - len(prompt)))
                check_growth(self.budget, self.store.pinned_blocks(), session.pinned_blocks, len(prompt) + run_max)
            params.max_tokens = run_max
            params.extra_args = {**(params.extra_args or {}), **make_extra_args(session.id, commit)}
            params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
            result = TurnResult(session, len(prompt), session.kv_tokens)
            session.touch()
            started = time.monotonic()
            if not commit:
                self._query_started()
                query_counted = True
            async for delta in self._generate(prompt, params, result):
                if result.finished and commit:
                    ensure_open(session)
                    await self._commit(session, turn_input, prompt, result)
                    committed = True
                yield result, delta
            if not commit:
                self.metrics.query_latency.observe(time.monotonic() - started)
        finally:
            if query_counted:
                self._query_finished()
            await _survive_cancellation(self._end_turn(session, commit, lock_held, committed))

    def _query_started(self) -> None:
        self._queries_in_flight += 1
        self._queries_idle.clear()

    def _query_finished(self) -> None:
        self._queries_in_flight -= 1
        if self._queries_in_flight == 0:
            self._queries_idle.set()

    async def yield_to_queries(self, max_wait_s: float) -> None:
        """Wait until no read-only query is generating, or ``max_wait_s`` passed
        (so continuous queries cannot starve ingestion)."""
        try:
            await asyncio.wait_for(self._queries_idle.wait(), max_wait_s)
        except asyncio.TimeoutError:
            pass

    async def _end_turn(self, session: Session, commit: bool, lock_held: bool, committed: bool) -> None:
        if commit:
            if lock_held:
                if not committed:
                    await self._rollback(session)
                session.write_lock.release()
            session.turn_in_flight = False
        session.touch()

    async def _generate(self, prompt: list[int], params: SamplingParams, result: TurnResult):
        request_id = f"stateful-{result.session.id}-{uuid.uuid4().hex[:12]}"
        gen = self.bridge.generate(prompt, params, request_id)
        result.session.active_request_ids.add(request_id)
        try:
            async for out in gen:
                completion = out.outputs[0]
                result.output_token_ids.extend(completion.token_ids)
                result.text += completion.text
                if out.num_cached_tokens is not None:
                    result.cached_tokens = out.num_cached_tokens
                if out.finished:
                    result.finish_reason = completion.finish_reason
                    result.finished = True
                yield out
        finally:
            # closing vLLM's generator aborts the engine request if it is still running
            await _survive_cancellation(gen.aclose())
            result.session.active_request_ids.discard(request_id)

    async def _commit(self, session: Session, turn_input: TurnInput, prompt: list[int], result: TurnResult) -> None:
        session.token_ids = prompt + result.output_token_ids
        if turn_input.is_chat:
            tail = self.bridge.decode_with_specials(result.output_token_ids[-4:])
            session.messages = session.messages + turn_input.messages + [{"role": "assistant", "content": result.text}]
            session.pending_chat_text = self.bridge.closing.remainder(tail)
        session.version += 1
        await self._sync(session)
        self.metrics.turns.inc()
        self.metrics.recomputed.inc(result.recomputed_tokens)
        self.metrics.reused.inc(result.cached_tokens)

    async def _sync(self, session: Session) -> None:
        info = await self.bridge.call("sync", session_id=session.id, max_tokens=len(session.token_ids))
        session.kv_tokens = info["pinned_tokens"]
        session.pinned_blocks = info["pinned_blocks"]
        self.metrics.refresh(self.store)

    async def _rollback(self, session: Session) -> None:
        try:
            await self._sync(session)
        except Exception:  # engine gone: nothing left to trim
            pass

    # --- prefill-only ingestion (session creation with content, appends) ---------

    async def ingest_now(self, session: Session, turn_input: TurnInput) -> None:
        """Prefill ``turn_input`` into the session and commit it (no visible output).

        vLLM always samples one token; it is discarded and never enters the
        session. Caller holds ``session.write_lock``.
        """
        ensure_open(session)
        if not turn_input.token_ids:
            return
        prompt = session.token_ids + turn_input.token_ids
        self._check_fits(session, len(prompt) + 1, None)
        assert self.budget is not None
        check_growth(self.budget, self.store.pinned_blocks(), session.pinned_blocks, len(prompt))
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        params.extra_args = make_extra_args(session.id, True)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        result = TurnResult(session, len(prompt), session.kv_tokens)
        committed = False
        try:
            async for _ in self._generate(prompt, params, result):
                pass
            if session.state != "resident":
                return
            session.token_ids = prompt
            if turn_input.is_chat:
                session.messages = session.messages + turn_input.messages
                session.pending_chat_text = ""
            await self._sync(session)
            committed = True
            self.metrics.ingested.inc(len(turn_input.token_ids))
        finally:
            if not committed:
                await _survive_cancellation(self._rollback(session))

    # --- close and expiry ----------------------------------------------------------

    async def close(self, session_id: str, reason: str = "closed") -> dict[str, Any]:
        """Remove the session and release every block it pins.

        In-flight work on it is aborted first and the release waits for the
        session's write lock, so a finishing turn or ingestion cannot pin blocks
        for a session that no longer exists.
        """
        session = self.store.get(session_id)
        self.store.remove(session_id)
        for request_id in list(session.active_request_ids):
            await self.bridge.abort(request_id)
        async with session.ingest_cond:
            session.ingest_cond.notify_all()
        async with session.write_lock:
            info = await self.bridge.call("release", session_id=session_id)
        self.metrics.refresh(self.store)
        self.metrics.closed.labels(reason=reason).inc()
        return {"id": session_id, "object": "session.deleted", "deleted": True, "freed_blocks": info["freed_blocks"]}

    async def expire_loop(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for session in self.store.expired():
                if not session.write_lock.locked():
                    await self.close(session.id, reason="expired")


def ensure_open(session: Session) -> None:
    """Raise 409 for a failed session and 404 for a closed one."""
    if session.state == "failed":
        raise SessionError(
            409,
            f"session '{session.id}' failed to ingest acknowledged data ({session.error}); delete it",
            "session_failed",
        )
    if session.state != "resident":
        raise SessionError(404, f"session '{session.id}' was closed", "session_not_found")


async def _survive_cancellation(coro) -> None:
    """Run cleanup to completion even if the awaiting task is being cancelled
    (Starlette cancels a disconnected stream's task, and anyio re-cancels every
    await inside it)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        pass
