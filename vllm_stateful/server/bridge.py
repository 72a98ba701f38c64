"""The API server's view of the engine: tokenizer, chat template, generation,
and the ``stateful_call`` utility that reaches the scheduler's session pins.

Contract: nothing here that is O(text) or O(history) runs on the event loop.
Tokenization, chat-template rendering and large JSON parsing run in one
worker thread (one, because HF tokenizers are not safe to share between
threads), so a 4 MB append delays other tokenization, never the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from vllm.inputs.engine import tokens_input
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

from vllm_stateful.plugin import ENGINE_METHOD
from vllm_stateful.server.detokenizer_prime import primes_alone
from vllm_stateful.server.errors import from_vllm
from vllm_stateful.sessions.chat_render import Message, ReplyClosing, continuation, reply_closing
from vllm_stateful.sessions.store import SessionError

T = TypeVar("T")

# Bodies smaller than this are parsed on the event loop (faster than a thread hop).
INLINE_JSON_BYTES = 64 * 1024


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _strict_json(body: bytes) -> Any:
    return json.loads(body, parse_constant=_refuse_constant)


class EngineBridge:
    def __init__(
        self,
        engine_client: Any,
        served_model_names: Sequence[str],
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine_client
        self.served_model_names = list(served_model_names)
        self.model_config = engine_client.model_config
        self.max_model_len: int = self.model_config.max_model_len
        self.tokenizer = engine_client.get_tokenizer()
        self.chat_template = chat_template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.default_sampling_params: dict[str, Any] = self.model_config.get_diff_sampling_param()
        # vLLM's own bound (renderers/base.py): ids up to the larger of tokenizer and model vocab.
        self.max_token_id: int = max(
            getattr(self.tokenizer, "max_token_id", len(self.tokenizer) - 1), self.model_config.get_vocab_size() - 1
        )
        # No token is longer than this many characters: ``len(text) / this`` is a
        # lower bound on a text's token count, checked before tokenizing.
        self.max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-stateful-tok")
        self._closing: ReplyClosing | None = None
        # vLLM writes computed blocks through to a KV offloading tier (--kv-offloading-size or a
        # KV connector): a session spilled from the pool loads its full blocks back from there.
        transfer = getattr(getattr(engine_client, "vllm_config", None), "kv_transfer_config", None)
        connector = str(getattr(transfer, "kv_connector", "") or "")
        self.has_offload_tier = "Offloading" in connector or "LMCache" in connector
        parallel = getattr(getattr(engine_client, "vllm_config", None), "parallel_config", None)
        self.dp_size: int = int(getattr(parallel, "data_parallel_size", 1) or 1)
        core = engine_client.engine_core
        if self.dp_size > 1 and not hasattr(core, "_call_utility_async"):
            raise RuntimeError(
                "vllm-stateful: this vLLM's engine client cannot address one data-parallel rank "
                "(AsyncMPClient._call_utility_async, vLLM 0.32); run with --data-parallel-size 1"
            )
        if self.dp_size > 1 and len(getattr(core, "core_engines", ())) != self.dp_size:
            raise RuntimeError(
                f"vllm-stateful: this API server reaches {len(getattr(core, 'core_engines', ()))} of "
                f"{self.dp_size} data-parallel ranks (external or hybrid load balancing, "
                "--data-parallel-size-local); sessions need one API server that reaches every rank"
            )

    async def call(self, op: str, rank: int = 0, **args: Any) -> Any:
        """Run a session op on data-parallel rank ``rank``'s engine-core thread (see ``engine/control.py``).

        One rank only, so a busy rank never delays another's session. vLLM 0.32's public API reaches
        rank 0 (``call_utility_async``) or every rank (``call_utility_all_async``); one chosen rank is
        its ``_call_utility_async(engine=...)`` (see patches/README.md)."""
        core = self.engine.engine_core
        if self.dp_size == 1:
            return await core.call_utility_async(ENGINE_METHOD, op, args)
        if not 0 <= rank < self.dp_size:
            raise ValueError(f"data-parallel rank {rank} out of range 0..{self.dp_size - 1}")
        return await core._call_utility_async(ENGINE_METHOD, op, args, engine=core.core_engines[rank])

    async def call_all(self, op: str, **args: Any) -> list[Any]:
        """Run a session op on every data-parallel rank; results in rank order."""
        core = self.engine.engine_core
        if self.dp_size == 1:
            return [await core.call_utility_async(ENGINE_METHOD, op, args)]
        return list(await core.call_utility_all_async(ENGINE_METHOD, op, args))

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def parse_json(self, body: bytes) -> Any:
        """Strict JSON (NaN and Infinity refused with ValueError), parsed off the loop when large."""
        if len(body) <= INLINE_JSON_BYTES:
            return _strict_json(body)
        return await self.off_loop(_strict_json, body)

    # --- text <-> tokens (call through off_loop) ------------------------------------

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        """The chat template's text; a template that refuses the messages is a 400."""
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
                **self.chat_template_kwargs,
            )
        except Exception as exc:
            if not any(cls.__name__ == "TemplateError" for cls in type(exc).__mro__):
                raise
            raise SessionError(400, f"the chat template refused the messages: {exc}", "template_error") from exc

    def continuation(self, previous: Sequence[Message], new: Sequence[Message], add_generation_prompt: bool) -> str:
        return continuation(self.render, previous, new, add_generation_prompt)

    @property
    def closing(self) -> ReplyClosing:
        if self._closing is None:
            self._closing = reply_closing(self.render)
        return self._closing

    def encode(self, text: str, first: bool) -> list[int]:
        """Tokens for ``text``; special tokens (BOS) only at the start of a session.

        Text the tokenizer cannot take (e.g. a lone UTF-16 surrogate from a JSON escape) is a 400."""
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=first))
        except (TypeError, ValueError, UnicodeError) as exc:
            raise SessionError(400, f"the text cannot be tokenized: {exc}", "invalid_request") from exc

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def primes_alone(self, tail: list[int], skip_special_tokens: bool) -> bool:
        """vLLM's detokenizer, primed with ``tail`` only, decodes what follows as if primed with the
        whole prompt (``detokenizer_prime``); decoded as vLLM's detokenizer does."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None:
            return primes_alone(tail, lambda ids: backend.decode(ids, skip_special_tokens))
        return primes_alone(tail, lambda ids: self.decode(ids, skip_special_tokens))

    def min_tokens_of(self, chars: int) -> int:
        """A lower bound on the tokens of any text of ``chars`` characters, without tokenizing it."""
        return -(-chars // self.max_token_chars)

    # --- generation -------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        cache_salt: str,
        priority: int = 0,
        session_id: str | None = None,
        rank: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's ``generate`` on data-parallel rank ``rank``; a request vLLM refuses raises
        SessionError with vLLM's status. The prompt goes in as an already rendered token input (the
        form vLLM's own serving code passes; a raw prompt dict is deprecated in 0.32 and would be
        rendered again); vLLM still validates it (vocabulary, length)."""
        prompt = tokens_input(prompt_token_ids, cache_salt=cache_salt)
        dp_rank = rank if self.dp_size > 1 else None
        gen = self.engine.generate(
            prompt, params, request_id, priority=priority, session_id=session_id, data_parallel_rank=dp_rank
        )
        try:
            async for out in gen:
                yield out
        except (asyncio.CancelledError, GeneratorExit, SessionError):
            raise
        except Exception as exc:
            raise from_vllm(exc) from exc
        finally:
            await gen.aclose()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
