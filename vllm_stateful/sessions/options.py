"""Which OpenAI request fields a session request honours.

A session request is parsed with vLLM's own request models, so every field
vLLM knows is accepted by the parser. A field the session path does not
honour must be refused (400), never silently ignored: anything the client set
explicitly to a value other than its default, and that is not listed here, is
refused. Fields a future vLLM adds are therefore refused until reviewed.
No vLLM import: callers pass the parsed request's explicitly-set fields,
values and defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Honoured by both endpoints: they reach vLLM's SamplingParams (or the engine
# request) unchanged, or only shape the response.
_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "n",  # must be 1; checked separately with a clearer message
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "logit_bias",
        "allowed_token_ids",
        "bad_words",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "response_format",
        "structured_outputs",
        "repetition_detection",
        "stream_interval",
        "priority",
        "request_id",
        "user",
        "return_token_ids",
        "return_tokens_as_token_ids",  # only shapes logprobs, which sessions refuse
        "return_token_offsets",  # ignored by vLLM on generation endpoints too
        "mm_payload",
        "return_mm_kwargs",
        "vllm_xargs",  # keys reserved by the plugin are refused separately
        "session_id",  # vLLM's routing hint; passed through
    }
)
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "parallel_tool_calls"}
COMPLETION_FIELDS = _COMMON | {"prompt"}

WHY = {
    "logprobs": "logprobs are not supported on session requests yet",
    "top_logprobs": "logprobs are not supported on session requests yet",
    "prompt_logprobs": "prompt_logprobs are not supported on session requests",
    "echo": "echo is not supported on session requests",
    "suffix": "suffix is not supported on session requests",
    "tools": "tools are not supported on session requests yet",
    "cache_salt": "session requests are salted per tenant by the server; cache_salt cannot be set",
    "chat_template": "a session renders every turn with the server's chat template; chat_template cannot vary",
    "chat_template_kwargs": "a session renders every turn with the same template arguments",
    "add_generation_prompt": "a session turn always adds the generation prompt",
    "continue_final_message": "continue_final_message is not supported on session requests",
    "truncate_prompt_tokens": "a session cannot be truncated by a request",
    "best_of": "best_of is not supported on session requests",
}


# Fields vllm-router (0.1.x, SGLang's request schema) adds to every chat and completions body it
# forwards, at values that change nothing. vLLM ignores them; a session request drops them at
# exactly these values (any other value is refused like every unknown option).
ROUTER_NEUTRAL_FIELDS = {
    "no_stop_trim": False,
    "return_hidden_states": False,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "include_reasoning": True,
}


def drop_router_defaults(body: dict[str, Any]) -> None:
    for name, neutral in ROUTER_NEUTRAL_FIELDS.items():
        if name in body and body[name] is neutral:
            del body[name]


def unsupported_fields(
    explicitly_set: Iterable[str], values: Mapping[str, Any], defaults: Mapping[str, Any], honoured: frozenset[str]
) -> list[str]:
    """Explicitly set fields, outside ``honoured``, whose value is not the default."""
    return sorted(f for f in explicitly_set if f not in honoured and values.get(f) != defaults.get(f))


def refusal_message(field_name: str) -> str:
    return WHY.get(field_name, f"'{field_name}' is not supported on session requests")
