"""Chat continuation rendering with the project's ChatML template (jinja2, no engine)."""

import jinja2
import pytest

from vllm_stateful.demo_model import CHATML_TEMPLATE
from vllm_stateful.sessions.chat_render import (
    TemplateNotPrefixStable,
    continuation,
    reply_closing,
)

pytestmark = pytest.mark.unit
_TEMPLATE = jinja2.Environment().from_string(CHATML_TEMPLATE)


def chatml(messages, add_generation_prompt):
    return _TEMPLATE.render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_first_turn_is_the_full_rendering():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert continuation(chatml, [], msgs, True) == chatml(msgs, True)


def test_continuation_plus_history_equals_stateless_rendering():
    prev = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}]
    new = [{"role": "user", "content": "U2"}]
    assert chatml(prev, False) + continuation(chatml, prev, new, True) == chatml(prev + new, True)


def test_reply_closing_owes_only_what_the_model_did_not_emit():
    closing = reply_closing(chatml)
    assert closing.text == "<|im_end|>\n"
    assert closing.remainder("text<|im_end|>") == "\n"
    assert closing.remainder("text cut by max_tokens") == "<|im_end|>\n"


def test_prefix_unstable_template_is_refused():
    def unstable(messages, add_generation_prompt):
        return f"{len(messages)} messages: " + chatml(messages, add_generation_prompt)

    with pytest.raises(TemplateNotPrefixStable):
        continuation(unstable, [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], True)
