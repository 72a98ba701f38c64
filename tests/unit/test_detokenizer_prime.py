"""Priming the incremental detokenizer with the prompt's last 32 tokens gives the same text as
priming it with the whole prompt (patches/README.md, note 5)."""

from __future__ import annotations

import random

import msgspec
import pytest
from tokenizers.decoders import DecodeStream

from vllm_stateful import demo_model
from vllm_stateful.server.detokenizer_prime import PRIME_TOKENS, tail_request


@pytest.fixture(scope="module")
def tokenizer():
    return demo_model.build_tokenizer(512)._tokenizer


def _stream_text(tok, prime: list[int], generated: list[int]) -> str:
    stream = DecodeStream(ids=prime, skip_special_tokens=True)
    return "".join(stream.step(tok, t) or "" for t in generated)


def _primed(tok, prompt: list[int]) -> list[int]:
    class Request(msgspec.Struct):
        prompt_token_ids: list[int]

    return tail_request(Request(prompt), lambda ids: tok.decode(ids, True)).prompt_token_ids


def test_tail_priming_gives_the_same_text_as_whole_prompt_priming(tokenizer):
    rng = random.Random(5)
    text = tokenizer.encode("héllo wörld, 日本語のテキスト 🎉🎉 naïve café. The quick brown fox " * 10).ids
    multibyte = tokenizer.encode("日本語🎉é").ids
    vocab = tokenizer.get_vocab_size()
    shortened = 0
    for case in range(600):
        kind = case % 3
        if kind == 0:  # text cut anywhere, possibly inside a character
            prompt = text[: rng.randint(PRIME_TOKENS + 1, len(text))]
        else:  # any ids, or bytes of multi-byte characters in random order
            pool = range(vocab) if kind == 1 else multibyte
            prompt = [rng.choice(pool) for _ in range(rng.randint(PRIME_TOKENS + 1, 300))]
        generated = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))] if case % 2 else text[:20]
        primed = _primed(tokenizer, prompt)
        shortened += len(primed) == PRIME_TOKENS
        assert _stream_text(tokenizer, primed, generated) == _stream_text(tokenizer, prompt, generated), case
    assert shortened > 200  # most prompts are primed with their tail only


class _Request(msgspec.Struct):
    request_id: str
    prompt_token_ids: list[int] | None


def test_tail_request_keeps_the_last_tokens_and_leaves_short_prompts_alone():
    def decode(ids):
        return "".join(chr(65 + i % 26) for i in ids)

    long = _Request("a", list(range(100)))
    cut = tail_request(long, decode)
    assert cut.prompt_token_ids == list(range(100 - PRIME_TOKENS, 100)) and cut.request_id == "a"
    assert long.prompt_token_ids == list(range(100))  # the engine's request is not touched
    short = _Request("b", list(range(PRIME_TOKENS)))
    assert tail_request(short, decode) is short
    embeds = _Request("c", None)
    assert tail_request(embeds, decode) is embeds
    inside_a_character = _Request("d", list(range(100)))
    assert tail_request(inside_a_character, lambda ids: "ab\ufffd") is inside_a_character
    only_special_tokens = _Request("e", list(range(100)))  # decoded with skip_special_tokens: nothing
    assert tail_request(only_special_tokens, lambda ids: "") is only_special_tokens


def test_install_wraps_once(monkeypatch):
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    from vllm_stateful.server import detokenizer_prime

    monkeypatch.setattr(FastIncrementalDetokenizer, "__init__", FastIncrementalDetokenizer.__init__)  # restored after
    detokenizer_prime.install()
    first = FastIncrementalDetokenizer.__init__
    detokenizer_prime.install()
    assert FastIncrementalDetokenizer.__init__ is first and first._vllm_stateful_wrapped
