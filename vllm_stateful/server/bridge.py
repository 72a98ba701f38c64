"""The API server's view of the engine: tokenizer, chat template, generation,
and the ``stateful_call`` utility that reaches the scheduler's session pins."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

from vllm_stateful.plugin import ENGINE_METHOD
from vllm_stateful.sessions.chat_render import ReplyClosing, reply_closing


class EngineBridge:
    def __init__(self, engine_client: Any, served_model_names: Sequence[str]) -> None:
        self.engine = engine_client
        self.served_model_names = list(served_model_names)
        self.model_config = engine_client.model_config
        self.max_model_len: int = self.model_config.max_model_len
        self.tokenizer = engine_client.get_tokenizer()
        self.default_sampling_params: dict[str, Any] = self.model_config.get_diff_sampling_param()
        # vLLM's own bound (renderers/base.py): ids up to the larger of tokenizer and model vocab.
        self.max_token_id: int = max(
            getattr(self.tokenizer, "max_token_id", len(self.tokenizer) - 1), self.model_config.get_vocab_size() - 1
        )
        self._closing: ReplyClosing | None = None

    async def call(self, op: str, **args: Any) -> Any:
        """Run a session op on the engine-core thread (see StatefulSchedulerMixin)."""
        return await self.engine.engine_core.call_utility_async(ENGINE_METHOD, op, args)

    # --- text <-> tokens -------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @property
    def closing(self) -> ReplyClosing:
        if self._closing is None:
            self._closing = reply_closing(self.render)
        return self._closing

    def encode(self, text: str, first: bool) -> list[int]:
        """Tokens for ``text``; special tokens (BOS) only at the start of a session."""
        return list(self.tokenizer.encode(text, add_special_tokens=first))

    def decode_with_specials(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    # --- generation -------------------------------------------------------------

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self.engine.generate({"prompt_token_ids": prompt_token_ids}, params, request_id)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)
