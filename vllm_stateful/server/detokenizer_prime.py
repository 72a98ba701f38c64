"""Prime vLLM's incremental detokenizer with the prompt's tail, not the whole prompt
(patches/README.md, note 5).

vLLM 0.32's ``FastIncrementalDetokenizer`` hands every prompt token to
``tokenizers.decoders.DecodeStream(ids=...)``, whose first ``step`` decodes all of
them: O(context) in the API server for every request, ~8 ms at 32k tokens on
our CPU, paid again by each 16-token query on a long session. Decoding the next
token only depends on the few tokens before it (a multi-byte character spans at
most 4 byte tokens; a leading-space rule only looks at the start of the stream),
so the stream is primed with the last ``PRIME_TOKENS`` prompt tokens instead,
unless they end inside a character or decode to nothing (all skipped special
tokens): then the whole prompt, as vLLM does. The
generated text is the same (unit-tested against full priming on text and on
random byte-level token sequences).

Installed by the endpoint plugin, so only in an API server with sessions switched on; there it
serves every request, session or not (the same text, less work).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

PRIME_TOKENS = 32


def tail_request(request: Any, decode: Callable[[list[int]], str], keep: int = PRIME_TOKENS) -> Any:
    """``request`` with only its last ``keep`` prompt tokens, when they decode to some text ending in a
    whole character; otherwise the same object, so the output stays vLLM's: a prompt ending inside a
    character (vLLM's stream re-emits earlier prompt text) or in ``keep`` skipped special tokens
    (a SentencePiece decoder would treat the first generated token as the start of the text)."""
    import msgspec

    ids = getattr(request, "prompt_token_ids", None)
    if ids is None or len(ids) <= keep:
        return request
    tail = list(ids[-keep:])
    if not primes_alone(tail, decode):
        return request
    return msgspec.structs.replace(request, prompt_token_ids=tail)


def primes_alone(tail: list[int], decode: Callable[[list[int]], str]) -> bool:
    """A stream primed with ``tail`` decodes what follows as one primed with everything before it
    would: ``tail`` decodes to some text that ends in a whole character (not all skipped special
    tokens, not inside a multi-byte character)."""
    text = decode(tail)
    return bool(text) and not text.endswith("\ufffd")


def _primed_with_tail(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self, tokenizer: Any, request: Any) -> None:
        skip = getattr(request.sampling_params, "skip_special_tokens", True)
        init(self, tokenizer, tail_request(request, lambda ids: tokenizer._tokenizer.decode(ids, skip)))

    __init__._vllm_stateful_wrapped = True  # type: ignore[attr-defined]
    return __init__


def install() -> None:
    """Wrap ``FastIncrementalDetokenizer.__init__`` (idempotent)."""
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    if not getattr(FastIncrementalDetokenizer.__init__, "_vllm_stateful_wrapped", False):
        FastIncrementalDetokenizer.__init__ = _primed_with_tail(FastIncrementalDetokenizer.__init__)
