"""Flash-query evaluation: re-answer a session's flash queries after every
committed change, on spare capacity, newest version first.

Contract:
* Registering evaluates at once; every committed change (turn, ingested
  append) schedules a re-evaluation of the session's flash queries.
* One evaluation round per session at a time; a round evaluates every due
  query of the session together (one engine batch over the session's pinned
  KV) at the committed version it started from. Changes that land while a
  round runs are coalesced: the next round starts from the newest version, so
  under a fast feed the backlog never grows (versions skipped are counted as
  superseded).
* Evaluations are read-only queries in the engine's flash class: they run only
  when no foreground request (turn, query, ingestion, plain traffic) is
  running or waiting (``engine/work_classes.py``), and do not count as
  client use of the session (TTL) or delay ingestion.
* A read-only query whose prompt tokens, token state and greedy sampling match a
  cached answer is answered from it (``session.flash_hit``).
* A failed evaluation (context full, engine paused) is recorded on the query
  and retried at the next version; the runner itself never dies.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any

from vllm.sampling_params import SamplingParams

from vllm_stateful.server.service import SessionService
from vllm_stateful.server.turn_types import TurnInput, TurnResult
from vllm_stateful.sessions.flash import FlashAnswer, FlashQuery, confidence_of, sampling_signature
from vllm_stateful.sessions.store import Session, SessionError

logger = logging.getLogger(__name__)


class FlashRunner:
    def __init__(self, service: SessionService) -> None:
        self.service = service
        self.config = service.config
        self._tasks: dict[str, asyncio.Task] = {}  # session key -> running round
        self._evaluated: dict[str, int] = {}  # session key -> version of its last round
        service.on_commit = self.changed
        service.cached_answer = self.answer_from_cache
        service.on_close = self.forget

    # --- registry -------------------------------------------------------------

    def register(self, session: Session, query: FlashQuery) -> None:
        cfg = self.config
        if not session.is_open:  # closed or failed while the registration was checked
            raise SessionError(404, f"session '{session.id}' was closed", "session_not_found")
        if len(session.flash) >= cfg.max_flash_queries_per_session:
            raise SessionError(
                429,
                f"session '{session.id}' holds its maximum of {cfg.max_flash_queries_per_session} flash queries",
                "too_many_flash_queries",
                retry_after=1.0,
            )
        if sum(len(s.flash) for s in self.service.store.all()) >= cfg.max_flash_queries:
            raise SessionError(
                429, f"the server holds its maximum of {cfg.max_flash_queries} flash queries",
                "too_many_flash_queries", retry_after=1.0,
            )  # fmt: skip
        session.flash[query.id] = query
        self.service.metrics.flash_queries.inc()
        self.changed(session)

    def unregister(self, session: Session, query: FlashQuery) -> None:
        if session.flash.pop(query.id, None) is not None:
            self.service.metrics.flash_queries.dec()
        query.remove()
        if not session.flash:
            self._evaluated.pop(session.key, None)  # skipped versions count only while queries exist

    def forget(self, session: Session) -> None:
        """The session closed: its queries are gone."""
        self.service.metrics.flash_queries.dec(len(session.flash))
        self._evaluated.pop(session.key, None)
        for query in session.flash.values():
            query.remove()

    # --- evaluation -------------------------------------------------------------

    def changed(self, session: Session) -> None:
        if not session.flash or not session.is_open:
            return
        task = self._tasks.get(session.key)
        if task is None or task.done():
            self._tasks[session.key] = asyncio.get_running_loop().create_task(self._rounds(session))

    async def _rounds(self, session: Session) -> None:
        metrics = self.service.metrics
        try:
            while session.is_open:
                version, seq = session.committed_version, session.commit_seq
                due = [q for q in session.flash.values() if q.due(seq)]
                if not due:
                    break
                previous = self._evaluated.get(session.key)
                if previous is not None and version - previous > 1:
                    metrics.flash_superseded.inc(version - previous - 1)  # versions never evaluated
                self._evaluated[session.key] = version
                await asyncio.gather(*(self._evaluate(session, q) for q in due))
        except Exception:
            logger.exception("vllm-stateful: flash evaluation of session %s failed", session.id)
            metrics.background_errors.labels(task="flash").inc()
        finally:
            if self._tasks.get(session.key) is asyncio.current_task():
                del self._tasks[session.key]

    async def _evaluate(self, session: Session, query: FlashQuery) -> None:
        service = self.service
        seq = session.commit_seq
        input_ids: list[int] = []

        async def build(s: Session) -> TurnInput:
            turn_input = await query.build_input(s)
            input_ids[:] = turn_input.token_ids
            return turn_input

        def params(max_tokens: int) -> SamplingParams:
            p = query.make_params(max_tokens)
            p.logprobs = 1  # the sampled token's logprob, for confidence
            return p

        result: TurnResult | None = None
        last: Any = None
        try:
            turn = service.run_turn(session, False, build, params, query.max_tokens, False, False, flash=True)
            async with aclosing(turn) as outputs:
                async for item in outputs:
                    result, last = item[0], item[1] if item[1] is not None else last
        except SessionError as err:
            if err.code != "session_not_found":
                query.fail(err.message, seq)
            return
        except Exception as exc:  # e.g. the chat template refused the session's new state
            logger.warning("vllm-stateful: flash query %s of session %s failed: %r", query.id, session.id, exc)
            query.fail(f"{type(exc).__name__}: {exc}", seq)
            return
        if result is None or not result.finished or query.removed or not session.is_open:
            return
        cumulative = last.outputs[0].cumulative_logprob if last is not None else None
        answer = FlashAnswer(
            version=result.version,
            commit_seq=result.read_seq,
            read_tokens=result.read_tokens,
            text=result.text,
            token_ids=tuple(result.output_token_ids),
            input_ids=tuple(input_ids),
            finish_reason=result.finish_reason,
            confidence=confidence_of(cumulative, len(result.output_token_ids)),
        )
        query.evaluations += 1
        query.record(answer)
        service.metrics.flash_evaluations.inc()
        session.events.publish(
            "flash_answer",
            {
                "flash_query_id": query.id,
                "name": query.name,
                "version": answer.version,
                "answer": answer.text,
                "confidence": answer.confidence,
                "finish_reason": answer.finish_reason,
            },
        )

    # --- reads ---------------------------------------------------------------------

    def answer_from_cache(self, result: TurnResult, input_ids: list[int], params: SamplingParams) -> bool:
        """Fill ``result`` from a flash query's answer at ``result.version``, if one matches exactly."""
        signature = sampling_signature(params)
        if signature is None or params.logprobs is not None or params.prompt_logprobs is not None:
            return False
        for query in result.session.flash.values():
            a = query.answer
            same_state = a is not None and a.commit_seq == result.read_seq
            if same_state and query.signature == signature and list(a.input_ids) == input_ids:
                result.output_token_ids = list(a.token_ids)
                result.text = a.text
                result.finish_reason = a.finish_reason
                result.cached_tokens = result.prompt_tokens
                result.finished = result.flash_hit = True
                self.service.metrics.flash_hits.inc()
                return True
        return False

    def observe_age(self, session: Session, query: FlashQuery) -> None:
        if query.answer is not None:
            self.service.metrics.flash_answer_age.observe(session.version - query.answer.version)
