"""HTTP models of the session routes."""

import pytest
from pydantic import ValidationError

from vllm_stateful.server.protocol import AppendRequest, ChatMessage, CreateSessionRequest

pytestmark = pytest.mark.unit


def test_append_takes_exactly_one_kind_of_data():
    assert AppendRequest(text="x").wait is False
    assert AppendRequest(token_ids=[1, 2], wait=True).token_ids == [1, 2]
    for bad in (
        {},
        {"text": "a", "token_ids": [1]},
        {"token_ids": []},
        {"token_ids": [-1]},
        {"text": ""},
        {"messages": []},
        {"text": "a", "extra": 1},
    ):
        with pytest.raises(ValidationError):
            AppendRequest.model_validate(bad)


def test_create_session_rejects_both_contents_and_unknown_fields():
    assert CreateSessionRequest.model_validate({"id": "a", "ttl_s": 5}).ttl_s == 5
    for bad in ({"messages": [{"role": "user", "content": "x"}], "prompt": "y"}, {"ttl_s": -1}, {"nope": 1}):
        with pytest.raises(ValidationError):
            CreateSessionRequest.model_validate(bad)


def test_chat_message_text_parts_are_joined_and_others_refused():
    msg = ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert msg.as_template_message() == {"role": "user", "content": "ab"}
    assert ChatMessage(role="assistant", content=None).as_template_message()["content"] == ""
    with pytest.raises(ValueError):
        ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}]).as_template_message()
