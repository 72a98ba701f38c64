"""Which request fields sessions honour, and what a turn keeps after a stop string (pure)."""

import pytest

from vllm_stateful.sessions.options import CHAT_FIELDS, COMPLETION_FIELDS, refusal_message, unsupported_fields
from vllm_stateful.sessions.visible_output import visible_output

pytestmark = pytest.mark.unit


def test_fields_set_to_non_defaults_outside_the_list_are_refused():
    defaults = {"echo": False, "logprobs": None, "temperature": None, "best_of": None, "future_field": None}
    assert unsupported_fields({"temperature"}, {"temperature": 0.5}, defaults, COMPLETION_FIELDS) == []
    # explicitly sending a default is not an unsupported option
    assert (
        unsupported_fields({"echo", "logprobs"}, {"echo": False, "logprobs": None}, defaults, COMPLETION_FIELDS) == []
    )
    got = unsupported_fields({"echo", "logprobs"}, {"echo": True, "logprobs": 0}, defaults, COMPLETION_FIELDS)
    assert got == ["echo", "logprobs"]  # logprobs: 0 is a request for logprobs, not "off"
    # a field a future vLLM adds is refused until someone reviews it
    assert unsupported_fields({"future_field"}, {"future_field": 1}, defaults, CHAT_FIELDS) == ["future_field"]
    assert "logprobs" in refusal_message("logprobs") and "future_field" in refusal_message("future_field")
    assert "max_completion_tokens" in CHAT_FIELDS and "max_completion_tokens" not in COMPLETION_FIELDS


# A character-level "tokenizer": token i is chr(i).
def _decode(ids):
    return "".join(chr(i) for i in ids)


def _encode(text):
    return [ord(c) for c in text]


def test_output_cut_at_a_stop_string_keeps_exactly_what_was_sent():
    # generated " 292& 714" but the stop string "1" cut the text after " 292& 7"
    ids = [ord(c) for c in " 292& 7"] + [1000]  # token 1000 decodes to "14": it holds the stop string
    decode = lambda xs: "".join("14" if i == 1000 else chr(i) for i in xs)  # noqa: E731
    out = visible_output(ids, " 292& 7", decode, _encode)
    assert out.kept_ids == ids[:-1] and out.extra_ids == []
    assert decode(out.token_ids) == " 292& 7"


def test_a_token_straddling_the_cut_is_replaced_by_the_sent_text():
    decode = lambda xs: "".join({1: "ab", 2: "cd"}.get(i, chr(i)) for i in xs)  # noqa: E731
    out = visible_output([1, 2], "abc", decode, _encode)  # stop string "d" cut inside token 2
    assert out.kept_ids == [1] and out.extra_ids == [ord("c")]
    assert decode(out.token_ids) == "abc"


def test_nothing_matches_then_all_sent_text_is_tokenized_again():
    out = visible_output([ord("x")] * 20, "y" * 3, _decode, _encode)
    assert out.kept_ids == [] and _decode(out.extra_ids) == "yyy"
    assert visible_output([], "", _decode, _encode).token_ids == []
