"""What a turn keeps: exactly the output its client was sent.

vLLM cuts the *text* of a completion at a stop string, but the token ids it
reports still include the token that contained the stop string (and whatever
that token carried past it). A session must hold what the client saw, so the
kept output is the longest prefix of the generated ids whose decoded text is
a prefix of the sent text, plus the remaining sent text tokenized afresh.
Only the kept ids have KV in the engine; the re-tokenized remainder is
prefilled with the next request. No vLLM import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_TOKENS_BACK = 8


@dataclass(frozen=True)
class VisibleOutput:
    kept_ids: list[int]  # a prefix of the generated ids (their KV is valid)
    extra_ids: list[int]  # the sent text after ``kept_ids``, tokenized

    @property
    def token_ids(self) -> list[int]:
        return self.kept_ids + self.extra_ids


def visible_output(
    output_ids: Sequence[int],
    sent_text: str,
    decode: Callable[[Sequence[int]], str],
    encode: Callable[[str], list[int]],
) -> VisibleOutput:
    """Split ``output_ids`` so that ``decode(kept) + decode(extra) == sent_text``
    (``decode(kept)`` is a prefix of ``sent_text``; ``extra`` encodes the rest)."""
    ids = list(output_ids)
    # A stop string cuts within the last few tokens; look no further back than
    # that (bounded cost), else keep none of the ids: still exact, just recomputed.
    for k in range(len(ids), max(-1, len(ids) - MAX_TOKENS_BACK - 1), -1):
        text = decode(ids[:k])
        if sent_text.startswith(text):
            rest = sent_text[len(text) :]
            return VisibleOutput(ids[:k], encode(rest) if rest else [])
    return VisibleOutput([], encode(sent_text) if sent_text else [])
