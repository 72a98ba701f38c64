"""Flash queries: questions registered on a session, re-answered after every
change, and their cached answers (HTTP-free, no vLLM import).

Contract:
* A flash query's answer is cached per state of the session's tokens
  (``commit_seq``, bumped by every change); ``answer.version`` labels it
  with the session's committed version then. That label is a lower bound: a
  turn that committed while an older append was still queued is in the tokens
  read, above the label (``read_tokens`` says how many were read). ``stale``
  means the session has moved on since (``answer.version < session.version``).
* A rewind to version N keeps an answer only if it read exactly N's content
  (labelled N, over N's tokens) or is labelled below N (and so shown stale).
* ``confidence`` is the model's own certainty in its answer: the geometric
  mean of the generated tokens' probabilities, ``exp(mean logprob)``, in
  (0, 1]; 1.0 means every token was certain. None when nothing was generated.
* ``signature`` is what a read-only query must match, besides its prompt
  tokens and the token state, to be answered from the cache: only greedy flash
  queries have one (a sampled answer is not *the* answer to a repeat).
* Waiters (``?min_version=``) are woken on every new answer and when the
  query or its session goes away.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# SamplingParams fields that decide a greedy answer; all must match for a cache hit.
SIGNATURE_FIELDS = (
    "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
    "skip_special_tokens", "spaces_between_special_tokens", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "logit_bias", "allowed_token_ids", "bad_words", "structured_outputs", "min_p",
    "repetition_detection",
)  # fmt: skip
PLUGIN_ARGS_PREFIX = "stateful_"  # the plugin's own extra_args (tags, work class): not the client's


def sampling_signature(params: Any) -> tuple | None:
    """What a greedy answer depends on; None for sampled (non-greedy) params."""
    if getattr(params, "temperature", 1.0) != 0.0:
        return None
    extra = getattr(params, "extra_args", None) or {}
    client_args = sorted((k, repr(v)) for k, v in extra.items() if not str(k).startswith(PLUGIN_ARGS_PREFIX))
    return tuple(repr(getattr(params, name, None)) for name in SIGNATURE_FIELDS) + (repr(client_args),)


def confidence_of(cumulative_logprob: float | None, tokens: int) -> float | None:
    if cumulative_logprob is None or tokens == 0 or not math.isfinite(cumulative_logprob):
        return None
    return round(math.exp(cumulative_logprob / tokens), 6)


@dataclass(frozen=True)
class FlashAnswer:
    version: int
    commit_seq: int  # the session's token state it read
    read_tokens: int  # how many of the session's tokens it read (its history)
    text: str
    token_ids: tuple[int, ...]
    input_ids: tuple[int, ...]  # the query's own tokens at that version (for cache hits)
    finish_reason: str | None
    confidence: float | None
    computed_at: float = field(default_factory=time.time)


@dataclass(eq=False)
class FlashQuery:
    name: str | None
    request: dict[str, Any]  # the registration as given (echoed back)
    max_tokens: int
    signature: tuple | None
    build_input: Callable[..., Any]  # session -> awaitable TurnInput
    make_params: Callable[[int], Any]  # max_tokens -> SamplingParams
    id: str = field(default_factory=lambda: "fq-" + secrets.token_hex(12))
    created_at: float = field(default_factory=time.time)
    answer: FlashAnswer | None = None
    evaluations: int = 0
    error: str | None = None
    failed_seq: int | None = None  # not retried at this token state
    removed: bool = False
    _updated: asyncio.Event = field(default_factory=asyncio.Event)

    # answers computed over a token state before this one are refused (the session was rewound)
    min_seq: int = 0

    def record(self, answer: FlashAnswer) -> None:
        if answer.commit_seq >= self.min_seq and (self.answer is None or answer.commit_seq >= self.answer.commit_seq):
            self.answer, self.error = answer, None
        self._wake()

    def forget_after(self, version: int, n_tokens: int, commit_seq: int) -> None:
        """The session was rewound to ``version``, whose content is its first ``n_tokens`` tokens
        (its token state is now ``commit_seq``): answers of later versions, an answer labelled
        ``version`` that read more than its content, and any evaluation still running over the old
        state are dropped."""
        self.min_seq = commit_seq
        a = self.answer
        if a is not None and (a.version > version or (a.version == version and a.read_tokens != n_tokens)):
            self.answer = None
        self._wake()

    def fail(self, message: str, commit_seq: int) -> None:
        self.error, self.failed_seq = message, commit_seq
        self._wake()

    def due(self, commit_seq: int) -> bool:
        """Needs evaluating at token state ``commit_seq`` (no answer that fresh, and no failure there)."""
        fresh = self.answer is not None and self.answer.commit_seq >= commit_seq
        return not self.removed and not fresh and self.failed_seq != commit_seq

    def remove(self) -> None:
        self.removed = True
        self._wake()

    def _wake(self) -> None:
        self._updated.set()
        self._updated = asyncio.Event()

    async def wait_for_version(self, version: int, timeout_s: float, still_open: Callable[[], bool]) -> None:
        """Until an answer at ``version`` or later exists, the query or session is gone, or the timeout."""
        deadline = time.monotonic() + timeout_s
        while (self.answer is None or self.answer.version < version) and not self.removed and still_open():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._updated.wait(), left)
            except asyncio.TimeoutError:
                return

    def to_public(self, session_version: int, include_tokens: bool = False) -> dict[str, Any]:
        a = self.answer
        body: dict[str, Any] = {
            **self.request,
            "id": self.id,
            "object": "session.flash_query",
            "name": self.name,
            "created_at": int(self.created_at),
            "answer": a.text if a else None,
            "version": a.version if a else None,
            "computed_at": a.computed_at if a else None,
            "stale": a is None or a.version < session_version,
            "confidence": a.confidence if a else None,
            "finish_reason": a.finish_reason if a else None,
            "evaluations": self.evaluations,
        }
        if self.error:
            body["error"] = self.error
        if include_tokens and a is not None:
            body["answer_token_ids"] = list(a.token_ids)
        return body
