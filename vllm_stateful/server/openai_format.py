"""OpenAI response and stream-chunk bodies for session requests.

The shapes are vLLM's (``chat.completion``, ``chat.completion.chunk``,
``text_completion``) plus a top-level ``session`` object (API.md): on the
response, and on the final chunk(s) of a stream.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from vllm_stateful.server.turn_types import TurnResult


class ResponseShape:
    """Builds bodies for one request; ``chat`` selects chat vs completions."""

    def __init__(self, chat: bool, model: str, return_token_ids: bool = False, request_id: str | None = None) -> None:
        self.chat = chat
        self.return_token_ids = return_token_ids
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + (request_id if isinstance(request_id, str) else uuid.uuid4().hex)
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, result: TurnResult) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
            body = self._envelope("text_completion", [choice])
        if self.return_token_ids:
            choice["token_ids"] = list(result.output_token_ids)
        body["usage"] = result.usage()
        body["session"] = result.session_field()
        return body

    def chunk(
        self, text: str, finish_reason: str | None, first: bool = False, token_ids: list[int] | None = None
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids or [])
        return body

    def usage_chunk(self, result: TurnResult) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = result.usage()
        body["session"] = result.session_field()
        return body


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
