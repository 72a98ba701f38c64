"""One session's KV in the engine, seen from the API server: running a request
on it, keeping the engine's pin in step with the committed history, and
releasing it.

Contract: the engine's pin for a session always covers a prefix of the API
server's committed history. ``sync`` is the only way a commit reaches the
engine and it happens *before* the API state changes (callers apply the
returned info afterwards, with no await in between); ``rollback`` trims the
pin back to the committed history after work that did not commit.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

from vllm_stateful.engine.request_tags import UNRESOLVED_STOP_REASON, PrefixRef, with_prefix
from vllm_stateful.server.bridge import EngineBridge
from vllm_stateful.server.detokenizer_prime import PRIME_TOKENS
from vllm_stateful.server.turn_types import TurnResult
from vllm_stateful.sessions.store import PinView, Session, SessionError
from vllm_stateful.sessions.tenants import Tenancy
from vllm_stateful.sessions.visible_output import visible_output

logger = logging.getLogger(__name__)

# A shorter pinned prefix is sent rather than referenced (the saving would not pay for a resend).
MIN_REFERENCED_TOKENS = 256


class SessionKV:
    def __init__(self, bridge: EngineBridge, tenancy: Tenancy, references: bool = True) -> None:
        self.bridge = bridge
        self.tenancy = tenancy
        self.references = references  # send prefix references (``generate``)
        self.unresolved_references = 0  # requests resent whole (see ``generate``)

    async def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        result: TurnResult,
        priority: int = 0,
        session_id: str | None = None,
        background: bool = False,
        pin: PinView | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Run one engine request on ``result.session``, filling ``result`` as outputs arrive.

        ``pin``: what the engine pins of the history ``prompt`` starts with (read with that
        history): the request then references that prefix instead of sending it
        (``engine/prefix_refs.py``); a reference the engine can no longer resolve costs one resend
        with the whole prompt, before anything is yielded. The request counts as client use of the
        session while it runs (unless ``background``: flash evaluations); closing the iterator (or
        cancelling its consumer) aborts it in the engine."""
        session = result.session
        running = session.background_request_ids if background else session.active_request_ids
        try:
            ref = self.prefix_ref(session, prompt, params, pin)
            if ref is not None:
                referencing = params.clone()
                referencing.extra_args = with_prefix(params.extra_args or {}, self.tenancy.secret, ref)
                sent = self._run(session, prompt[ref.tokens :], referencing, priority, session_id, running)
                async with aclosing(sent) as outputs:
                    async for out in outputs:
                        # refused before it ran: resent whole (unless the session closed meanwhile)
                        if _unresolved(out) and not result.output_token_ids and session.is_open:
                            self.unresolved_references += 1
                            break
                        yield _filled(result, out, ref.tokens)
                    else:
                        return
            async with aclosing(self._run(session, prompt, params, priority, session_id, running)) as outputs:
                async for out in outputs:
                    yield _filled(result, out)
        finally:
            if not background:
                session.touch()

    def prefix_ref(
        self, session: Session, prompt: list[int], params: SamplingParams, pin: PinView | None
    ) -> PrefixRef | None:
        """The reference a request for ``prompt`` sends instead of its pinned prefix, or None.

        At least ``PRIME_TOKENS`` tokens are always sent, and only when the detokenizer primed with
        their tail decodes as if primed with the whole prompt: the request's text is unchanged.
        Requests that score their prompt (``prompt_logprobs``) send it whole, and so does one whose
        session moved to another data-parallel rank since ``pin`` was read."""
        if not self.references or pin is None or pin.generation < 0 or params.prompt_logprobs is not None:
            return None
        if pin.rank != session.data_parallel_rank:
            return None
        tokens = min(pin.tokens, len(prompt) - PRIME_TOKENS)
        if tokens < MIN_REFERENCED_TOKENS:
            return None
        if params.detokenize and not self.bridge.primes_alone(prompt[-PRIME_TOKENS:], params.skip_special_tokens):
            return None
        return PrefixRef(pin.generation, tokens)

    async def _run(
        self,
        session: Session,
        prompt: list[int],
        params: SamplingParams,
        priority: int,
        session_id: str | None,
        running: set[str],
    ) -> AsyncIterator[RequestOutput]:
        """One engine request, listed in ``running`` while it runs."""
        request_id = f"stateful-{session.key[:8]}-{uuid.uuid4().hex[:12]}"
        salt = self.tenancy.salt(session.tenant)
        gen = self.bridge.generate(prompt, params, request_id, salt, priority, session_id, session.data_parallel_rank)
        running.add(request_id)
        try:
            async for out in gen:
                yield out
        finally:
            await survive_cancellation(gen.aclose())
            running.discard(request_id)

    def kept_output(
        self, result: TurnResult, skip_special_tokens: bool, is_chat: bool, pending: str
    ) -> tuple[list[int], list[int], str]:
        """(kept generated ids, the rest of the sent text tokenized, text the template still owes).

        What a finished turn adds to its session: exactly what the client was
        sent (see ``visible_output``). Runs in the tokenizer thread."""
        kept, extra = list(result.output_token_ids), []
        if isinstance(result.stop_reason, str):  # cut at a stop string
            visible = visible_output(
                kept,
                result.text,
                lambda ids: self.bridge.decode(ids, skip_special_tokens),
                lambda text: self.bridge.encode(text, False),
            )
            kept, extra = visible.kept_ids, visible.extra_ids
        if is_chat:
            tail = self.bridge.decode(kept[-4:], skip_special_tokens=False) if not extra else ""
            pending = self.bridge.closing.remainder(tail)
        return kept, extra, pending

    async def call(self, session: Session, op: str, **args: Any) -> Any:
        """Run a session op on the data-parallel rank that holds the session's KV."""
        return await self.bridge.call(op, rank=session.data_parallel_rank, key=session.key, **args)

    async def sync(self, session: Session, keep_tokens: int) -> dict[str, int]:
        """Trim the engine's pin to the first ``keep_tokens`` tokens; 503 if the engine does not answer."""
        try:
            return await self.call(session, "sync", keep_tokens=keep_tokens)
        except Exception as exc:
            logger.exception("vllm-stateful: engine sync failed for session %s", session.id)
            raise SessionError(
                503, f"the engine did not confirm the session's KV ({exc}); nothing was committed", "engine_unavailable"
            ) from exc

    @staticmethod
    def apply(session: Session, info: dict[str, int], expected_tokens: int) -> None:
        """Record a commit's sync: the session should reuse ``expected_tokens`` tokens of KV
        (what the finished request computed); the engine pins ``info``. A session whose KV the
        engine did not keep (dropped by a reset or weight update meanwhile) is ``cold``, and its
        next request reports the re-prefill in ``recomputed_tokens``."""
        session.kv_tokens = expected_tokens
        session.note_pin(info)
        session.sync_seq += 1
        if info["pinned_tokens"]:
            session.state = "resident"
        elif session.token_ids:
            session.state = "cold"

    async def rollback(self, session: Session) -> None:
        """Trim the pin back to the committed history (best effort: a dead engine holds nothing).

        ``kv_tokens`` keeps what the session should reuse (so a later re-prefill is reported as
        recomputed); a session left without KV is ``cold``."""
        try:
            info = await self.call(session, "sync", keep_tokens=len(session.token_ids))
            session.note_pin(info)
            session.sync_seq += 1
            if not info["pinned_tokens"] and session.token_ids and session.state == "resident":
                session.state = "cold"
        except Exception:
            logger.warning("vllm-stateful: could not trim the KV of session %s after a rollback", session.id)

    async def release_when_unlocked(self, session: Session, timeout_s: float) -> int:
        """Release every pin once the session's write lock is free (no commit can follow);
        past ``timeout_s``, release now as well and again when the lock frees."""

        async def release_locked() -> int:
            async with session.write_lock:
                return (await self.call(session, "release"))["freed_blocks"]

        task = asyncio.ensure_future(release_locked())
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except asyncio.TimeoutError:
            logger.error("vllm-stateful: session %s stayed locked past its close; releasing now", session.id)
            return (await self.call(session, "release"))["freed_blocks"]


def _unresolved(out: RequestOutput) -> bool:
    """The engine refused the request's prefix reference: it finished unrun, with the engine's marker."""
    completion = out.outputs[0]
    return (
        out.finished
        and completion.finish_reason == "error"
        and completion.stop_reason == UNRESOLVED_STOP_REASON
        and not completion.token_ids
    )


def _filled(result: TurnResult, out: RequestOutput, referenced: int = 0) -> RequestOutput:
    """``out`` recorded into ``result``; ``referenced``: prompt tokens the request referenced instead
    of sending (vLLM counts its cached tokens over the tokens sent, ``prefix_refs.count_sent_only``)."""
    completion = out.outputs[0]
    result.output_token_ids.extend(completion.token_ids)
    result.text += completion.text
    if out.num_cached_tokens is not None:
        result.cached_tokens = out.num_cached_tokens + referenced
    if out.finished:
        result.finish_reason = completion.finish_reason
        result.stop_reason = completion.stop_reason
        result.finished = True
    return out


async def finish_then_cancel(coro: Any) -> Any:
    """Run ``coro`` to completion even if the awaiting task is cancelled meanwhile, then let the
    cancellation through: for work that must not stop half-way (a change saved to disk is applied
    in memory too). Returns its result, or raises its exception, when not cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
            except Exception:
                break
        if not task.cancelled():
            task.exception()  # retrieved: its failure is logged where it happened
        raise


async def survive_cancellation(coro) -> None:
    """Run cleanup to completion even if the awaiting task is being cancelled
    (Starlette cancels a disconnected stream's task, and anyio re-cancels every
    await inside it)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        pass
