"""Session-aware ``POST /v1/chat/completions`` and ``/v1/completions``.

A request naming a session (body ``stateful`` / ``ark_stateful``, header
``X-Stateful-Session``) runs on the caller's session; any other request goes
to vLLM's own handler, unchanged except that the plugin's reserved
``vllm_xargs`` keys are refused and, with several tenants, the prefix cache
is salted per tenant.

Every field of a session request is validated before anything happens: by
vLLM's own request model, by the list of fields a session honours
(``sessions/options.py``: the rest is a 400, never silently ignored) and by
vLLM's ``SamplingParams`` checks (``max_tokens: 0`` is a 400 as in vLLM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vllm_stateful.engine.request_tags import reserved_keys
from vllm_stateful.server.errors import bad_request, error_body, from_vllm
from vllm_stateful.server.http import (
    LeftToVLLM,
    cancel_on_disconnect,
    checked_id,
    guarded,
    parse_object,
    read_body,
    too_large,
    validated,
)
from vllm_stateful.server.openai_format import SSE_DONE, ResponseShape, sse
from vllm_stateful.server.protocol import (
    COMMIT_BODY_FIELD,
    CONSISTENCY_FIELD,
    MAX_STALENESS_FIELD,
    SESSION_BODY_FIELDS,
    SESSION_HEADER,
    check_token_ids,
    template_messages,
)
from vllm_stateful.server.routes_sessions import claim
from vllm_stateful.server.state import StatefulState, stateful_state
from vllm_stateful.server.turn_types import TurnInput
from vllm_stateful.sessions.consistency import ABSENT, READ_YOUR_WRITES, ConsistencyError, ReadConsistency
from vllm_stateful.sessions.options import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    drop_router_defaults,
    refusal_message,
    unsupported_fields,
)
from vllm_stateful.sessions.store import SessionError

router = APIRouter()

CHAT_PATH = "/v1/chat/completions"
# vllm_xargs keys vLLM itself reads from a request's extra_args (v1/request.py): KV transfer between engines,
# which a session's pinned KV cannot take part in.
ENGINE_XARGS = frozenset({"kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode"})
COMPLETIONS_PATH = "/v1/completions"


@router.post(CHAT_PATH)
@guarded
async def chat_completions(raw_request: Request) -> Response:
    return await _openai_request(raw_request, chat=True)


@router.post(COMPLETIONS_PATH)
@guarded
async def completions(raw_request: Request) -> Response:
    return await _openai_request(raw_request, chat=False)


async def _openai_request(raw_request: Request, chat: bool) -> Response:
    state = stateful_state(raw_request, require_ready=False)
    limit = state.config.max_request_body_bytes
    alias = state.config.session_header
    routed_id = raw_request.headers.get(alias) if alias else None  # the header a router hashes
    header_id = raw_request.headers.get(SESSION_HEADER, routed_id)
    body_bytes = await read_body(raw_request, limit if header_id is not None else None)
    body = await parse_object(body_bytes, state.bridge.parse_json)
    named = [body.pop(f) for f in SESSION_BODY_FIELDS if f in body]
    session_id = next((v for v in named if v is not None), header_id)
    if routed_id is not None and session_id != routed_id:  # the router would place it by another id
        raise bad_request(f"header '{alias}' and the request name different sessions", param=alias)
    commit = body.pop(COMMIT_BODY_FIELD, True)
    consistency, max_staleness = READ_YOUR_WRITES, ABSENT
    if session_id is not None:
        consistency = body.pop(CONSISTENCY_FIELD, consistency)
        max_staleness = body.pop(MAX_STALENESS_FIELD, ABSENT)
        drop_router_defaults(body)
    parsed = validated(state.chat_request_cls if chat else state.completion_request_cls, body)
    reserved = reserved_keys(parsed.vllm_xargs)
    if reserved:
        raise bad_request(f"vllm_xargs keys {reserved} are reserved for vllm-stateful", param="vllm_xargs")
    transfer = sorted(set(parsed.vllm_xargs or {}) & ENGINE_XARGS)
    if session_id is not None and transfer:
        raise bad_request(f"vllm_xargs keys {transfer} are not supported on session requests", "unsupported_in_session",
                          "vllm_xargs")  # fmt: skip
    if session_id is None:
        return await _stateless(state, raw_request, parsed, chat)
    if len(body_bytes) > limit:
        raise too_large(limit)
    state = stateful_state(raw_request)
    tenant = state.tenancy.tenant_of(raw_request.headers)
    session_id = checked_id(session_id)
    if not isinstance(commit, bool):
        raise bad_request("'stateful_commit' must be a boolean", param=COMMIT_BODY_FIELD)
    try:
        read = ReadConsistency.parse(consistency, max_staleness, commit, CONSISTENCY_FIELD, MAX_STALENESS_FIELD)
    except ConsistencyError as exc:
        raise bad_request(exc.message, exc.code or "invalid_request", exc.param) from None
    refuse_unsupported(parsed, chat)
    if parsed.model and parsed.model not in state.bridge.served_model_names:
        raise SessionError(404, f"the model '{parsed.model}' does not exist", "model_not_found", param="model")
    build = chat_builder(state, body) if chat else prompt_builder(state, parsed.prompt)
    max_tokens = _requested_max_tokens(parsed, chat)
    make_params(parsed, state, 1 if max_tokens is None else max_tokens)  # vLLM's checks, before any session is touched
    work = _run_session_request(
        state, raw_request, tenant, session_id, parsed, body, build, max_tokens, chat, commit,
        consistency=read,
    )  # fmt: skip
    return await cancel_on_disconnect(raw_request, work)


async def _stateless(state: StatefulState, raw_request: Request, parsed: Any, chat: bool) -> Response:
    if state.tenancy.multi_tenant and state.service.ready:
        tenant = state.tenancy.tenant_of(raw_request.headers)
        parsed.cache_salt = state.tenancy.salt(tenant, parsed.cache_salt)
    try:
        return await state.core_endpoints[CHAT_PATH if chat else COMPLETIONS_PATH](parsed, raw_request)
    except Exception as exc:  # vLLM's own handlers answer it, as for any stock request
        raise LeftToVLLM(exc) from exc


def _requested_max_tokens(parsed: Any, chat: bool) -> int | None:
    if chat and parsed.max_completion_tokens is not None:
        return parsed.max_completion_tokens
    return parsed.max_tokens


# Text fields vLLM's request models accept but its engine fails on (a 500) when they hold lone surrogates.
ENCODED_TEXT_FIELDS = ("stop", "bad_words")


def make_params(parsed: Any, state: StatefulState, max_tokens: int):
    """vLLM's SamplingParams for the request, through vLLM's own validation (400 if it refuses)."""
    for name in ENCODED_TEXT_FIELDS:
        value = getattr(parsed, name, None)
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for text in texts:
            if isinstance(text, str) and not _utf8(text):
                raise bad_request(f"'{name}' holds text that is not valid Unicode (a lone surrogate)", param=name)
    try:
        return parsed.to_sampling_params(max_tokens, state.bridge.default_sampling_params)
    except Exception as exc:  # vLLM's VLLMValidationError is not a ValueError
        raise from_vllm(exc) from None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _run_session_request(
    state: StatefulState,
    raw_request: Request,
    tenant: str,
    session_id: str,
    parsed: Any,
    body: dict,
    build: Callable,
    max_tokens: int | None,
    chat: bool,
    commit: bool,
    consistency: ReadConsistency,
) -> Response:
    service = state.service
    await claim(state, raw_request, tenant, session_id)
    session, created = service.open_session(tenant, session_id, commit)
    model = parsed.model or state.bridge.served_model_names[0]
    shape = ResponseShape(chat, model, bool(body.get("return_token_ids")), body.get("request_id"))
    turn = service.run_turn(
        session,
        created,
        build,
        lambda n: make_params(parsed, state, n),
        max_tokens,
        commit,
        bool(parsed.stream),
        priority=parsed.priority,
        session_id=parsed.session_id,
        consistency=consistency,
    )
    if not parsed.stream:
        items = [item async for item in turn]
        return JSONResponse(shape.full(items[-1][0]))
    include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    first = await turn.__anext__()  # refusals surface here, as an HTTP status
    return StreamingResponse(_stream(turn, first, shape, include_usage), media_type="text/event-stream")


async def _stream(turn, first, shape: ResponseShape, include_usage: bool):
    """SSE chunks of a turn; a refusal after the first chunk (the session was
    closed under it, the engine aborted it) ends the stream with an error event."""
    try:
        item, is_first = first, True
        while True:
            result, delta = item
            out = delta.outputs[0] if delta is not None else None
            body = shape.chunk(
                out.text if out else "",
                result.finish_reason if result.finished else None,
                first=is_first,
                token_ids=list(out.token_ids) if out else None,
            )
            if result.finished:
                body["session"] = result.session_field()
            yield sse(body)
            is_first = False
            try:
                item = await turn.__anext__()
            except StopAsyncIteration:
                break
        if include_usage:
            yield sse(shape.usage_chunk(result))
        yield SSE_DONE
    except SessionError as err:
        yield sse(error_body(err.status, err.message, err.code, err.param))
        yield SSE_DONE
    finally:
        await turn.aclose()


def chat_builder(state: StatefulState, body: dict[str, Any]) -> Callable:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must hold at least one new message", "unsupported_in_session", "messages")
    msgs = template_messages(messages)
    return lambda s: state.service.chat_input(s, msgs, add_generation_prompt=True)


def prompt_builder(state: StatefulState, prompt: Any) -> Callable:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty", param="prompt")
        return lambda s: state.service.text_input(s, prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        check_token_ids(prompt, state.bridge.max_token_id, "prompt")
        ids = list(prompt)

        async def tokens(_session) -> TurnInput:
            return TurnInput(ids)

        return tokens
    raise bad_request(
        "a session request takes one non-empty prompt (text or token ids)", "unsupported_in_session", "prompt"
    )


def refuse_unsupported(parsed: Any, chat: bool) -> None:
    """Options a session cannot honour are a 400, never silently ignored."""
    if (parsed.n or 1) != 1:
        raise bad_request("n>1 is not supported on session requests", "unsupported_in_session", "n")
    model_fields = type(parsed).model_fields
    defaults = {name: f.get_default(call_default_factory=False) for name, f in model_fields.items()}
    values = {name: getattr(parsed, name, None) for name in parsed.model_fields_set}
    refused = unsupported_fields(parsed.model_fields_set, values, defaults, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    if refused:
        raise bad_request(refusal_message(refused[0]), "unsupported_in_session", refused[0])
