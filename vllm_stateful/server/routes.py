"""HTTP routes: session-aware ``/v1/chat/completions`` and ``/v1/completions``
(requests without a session go to vLLM's own handlers untouched), and the
``/v1/sessions`` routes of API.md."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from vllm_stateful.server.errors import bad_request, error_body, error_response
from vllm_stateful.server.openai_format import SSE_DONE, ResponseShape, sse
from vllm_stateful.server.protocol import (
    COMMIT_BODY_FIELD,
    SESSION_BODY_FIELDS,
    SESSION_HEADER,
    AppendRequest,
    ChatMessage,
    CreateSessionRequest,
)
from vllm_stateful.server.service import TurnInput
from vllm_stateful.server.state import StatefulState
from vllm_stateful.sessions.chat_render import TemplateNotPrefixStable
from vllm_stateful.sessions.ids import is_valid_session_id
from vllm_stateful.sessions.store import SessionError

router = APIRouter()

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def _state(raw_request: Request) -> StatefulState:
    state = getattr(raw_request.app.state, "stateful", None)
    if state is None or state.service.budget is None:
        raise SessionError(503, "stateful sessions are not ready", "not_ready")
    return state


def _checked_id(session_id: Any) -> str:
    if not is_valid_session_id(session_id):
        raise bad_request("session id must be 1-128 characters of A-Za-z0-9._:-", "invalid_session_id", "stateful")
    return session_id


async def _json_body(raw_request: Request) -> dict[str, Any]:
    try:
        body = await raw_request.json()
    except Exception:
        raise bad_request("request body must be valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def _validated(model: type, body: dict[str, Any]):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise bad_request(f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), param=loc or None) from None


def guarded(handler: Callable[..., Awaitable[Response]]):
    """Turn SessionErrors into OpenAI-style error responses."""
    import functools

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(*args, **kwargs)
        except SessionError as err:
            return error_response(err)
        except TemplateNotPrefixStable as err:
            return error_response(bad_request(str(err), "template_not_prefix_stable"))

    return wrapper


# --- OpenAI endpoints ---------------------------------------------------------


@router.post(CHAT_PATH)
@guarded
async def chat_completions(raw_request: Request) -> Response:
    return await _openai_request(raw_request, chat=True)


@router.post(COMPLETIONS_PATH)
@guarded
async def completions(raw_request: Request) -> Response:
    return await _openai_request(raw_request, chat=False)


async def _openai_request(raw_request: Request, chat: bool) -> Response:
    body = await _json_body(raw_request)
    session_id = next((body.pop(f) for f in SESSION_BODY_FIELDS if f in body), None)
    session_id = session_id if session_id is not None else raw_request.headers.get(SESSION_HEADER)
    commit = body.pop(COMMIT_BODY_FIELD, True)
    state: StatefulState = raw_request.app.state.stateful
    parsed = _validated(state.chat_request_cls if chat else state.completion_request_cls, body)
    if session_id is None:
        return await state.core_endpoints[CHAT_PATH if chat else COMPLETIONS_PATH](parsed, raw_request)
    state = _state(raw_request)
    session_id = _checked_id(session_id)
    if not isinstance(commit, bool):
        raise bad_request("'stateful_commit' must be a boolean", param=COMMIT_BODY_FIELD)
    _refuse_unsupported(parsed, chat, body)
    if parsed.model and parsed.model not in state.bridge.served_model_names:
        raise SessionError(404, f"the model '{parsed.model}' does not exist", "model_not_found")
    service = state.service
    created = commit and session_id not in service.store
    session = service.store.get_or_create(session_id) if commit else service.store.get(session_id)
    try:
        return await _run_session_request(service, session, body, parsed, chat, commit, state)
    except BaseException:
        if created and session.version == 0 and not session.turn_in_flight:
            service.store.remove(session.id)  # a refused first request creates nothing
        raise


async def _run_session_request(service, session, body, parsed, chat: bool, commit: bool, state) -> Response:
    if chat:
        messages = _template_messages(ChatMessage.model_validate(m) for m in body["messages"])
        build = lambda s: service.chat_input(s, messages, add_generation_prompt=True)  # noqa: E731
        max_tokens = parsed.max_completion_tokens or parsed.max_tokens
    else:
        build = _prompt_builder(service, parsed.prompt)
        max_tokens = parsed.max_tokens
    params = parsed.to_sampling_params(max_tokens or 1, service.bridge.default_sampling_params)
    shape = ResponseShape(chat, parsed.model or state.bridge.served_model_names[0], bool(body.get("return_token_ids")))
    turn = service.run_turn(session, build, params, max_tokens, commit, bool(parsed.stream))
    if not parsed.stream:
        async for _result, _ in turn:
            pass
        return JSONResponse(shape.full(_result))
    include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    first = await turn.__anext__()  # refusals surface here, as an HTTP status
    return StreamingResponse(_stream(turn, first, shape, include_usage), media_type="text/event-stream")


async def _stream(turn, first, shape: ResponseShape, include_usage: bool):
    """SSE chunks of a turn; a refusal after the first chunk (the session was
    closed under it) ends the stream with an OpenAI-style error event."""
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
        yield sse(error_body(err.status, err.message, err.code))
        yield SSE_DONE
    finally:
        await turn.aclose()


def _template_messages(messages) -> list[dict[str, Any]]:
    try:
        return [m.as_template_message() for m in messages]
    except ValueError as exc:
        raise bad_request(str(exc), "unsupported_in_session", "messages") from None


def _prompt_builder(service, prompt: Any) -> Callable[[Any], TurnInput]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return lambda s: service.text_input(s, prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        _check_token_ids(service, prompt, "prompt")
        return lambda s: TurnInput(list(prompt))
    raise bad_request("a session request takes one prompt (text or token ids)", "unsupported_in_session", "prompt")


def _check_token_ids(service, token_ids: list[int], param: str) -> None:
    """Out-of-vocabulary ids are a 400 before anything is acknowledged or queued."""
    bad = [t for t in token_ids if t < 0 or t > service.bridge.max_token_id]
    if bad:
        raise bad_request(
            f"token id {bad[0]} is out of vocabulary (0..{service.bridge.max_token_id})", "invalid_token_id", param
        )


def _refuse_unsupported(parsed: Any, chat: bool, body: dict[str, Any]) -> None:
    """Options a session cannot honour are a 400, never silently ignored."""
    checks = [
        ("n", (parsed.n or 1) != 1, "n>1 is not supported on session requests"),
        ("logprobs", bool(body.get("logprobs")), "logprobs are not supported on session requests yet"),
        (
            "prompt_logprobs",
            body.get("prompt_logprobs") is not None,
            "prompt_logprobs are not supported on session requests",
        ),
    ]
    if chat:
        checks.append(("tools", bool(body.get("tools")), "tools are not supported on session requests yet"))
        checks.append(("messages", not body.get("messages"), "'messages' must hold at least one new message"))
    else:
        checks.append(("echo", bool(body.get("echo")), "echo is not supported on session requests"))
        checks.append(("suffix", body.get("suffix") is not None, "suffix is not supported on session requests"))
    for param, failed, message in checks:
        if failed:
            raise bad_request(message, "unsupported_in_session", param)


# --- session routes -------------------------------------------------------------


@router.post("/v1/sessions", status_code=201)
@guarded
async def create_session(raw_request: Request) -> Response:
    state = _state(raw_request)
    req = _validated(CreateSessionRequest, await _json_body(raw_request))
    if req.id is not None:
        _checked_id(req.id)
    service = state.service
    session = service.store.create(req.id, req.ttl_s)
    try:
        if req.messages or req.prompt is not None:
            async with session.write_lock:
                if req.messages:
                    msgs = _template_messages(req.messages)
                    turn_input = service.chat_input(session, msgs, add_generation_prompt=False)
                elif isinstance(req.prompt, str):
                    turn_input = service.text_input(session, req.prompt)
                else:
                    _check_token_ids(service, req.prompt, "prompt")
                    turn_input = TurnInput(list(req.prompt))
                await service.ingest_now(session, turn_input)
                if turn_input.token_ids:
                    session.version += 1
    except BaseException:
        await service.close(session.id, reason="failed")
        raise
    service.metrics.refresh(service.store)
    return JSONResponse(session.to_public(), status_code=201)


@router.get("/v1/sessions")
@guarded
async def list_sessions(raw_request: Request) -> Response:
    state = _state(raw_request)
    return JSONResponse({"object": "list", "data": [s.to_public() for s in state.service.store.all()]})


@router.get("/v1/sessions/{session_id}")
@guarded
async def get_session(session_id: str, raw_request: Request) -> Response:
    """``?include_tokens=true`` adds the session's token history (``token_ids``)."""
    state = _state(raw_request)
    session = state.service.store.get(_checked_id(session_id))
    body = session.to_public()
    if raw_request.query_params.get("include_tokens", "").lower() in ("1", "true"):
        body["token_ids"] = list(session.token_ids)
    return JSONResponse(body)


@router.delete("/v1/sessions/{session_id}")
@guarded
async def delete_session(session_id: str, raw_request: Request) -> Response:
    state = _state(raw_request)
    return JSONResponse(await state.service.close(_checked_id(session_id)))


@router.post("/v1/sessions/{session_id}/append")
@guarded
async def append(session_id: str, raw_request: Request) -> Response:
    state = _state(raw_request)
    req = _validated(AppendRequest, await _json_body(raw_request))
    session = state.service.store.get(_checked_id(session_id))
    messages = _template_messages(req.messages) if req.messages else None
    if req.token_ids is not None:
        _check_token_ids(state.service, req.token_ids, "token_ids")
    item = state.ingestor.append(session, req.text, req.token_ids, messages)
    if req.wait:
        await state.service.wait_ingested(session, item.seq)
        return JSONResponse(session.to_public(), status_code=200)
    return JSONResponse(
        {"id": session.id, "version": session.version, "queued_tokens": session.queued_tokens}, status_code=202
    )


@router.get("/v1/stateful/debug/integrity")
@guarded
async def integrity(raw_request: Request) -> Response:
    """Engine-side pin table vs. live sessions (used by tests and operators)."""
    state = _state(raw_request)
    engine = await state.bridge.call("integrity")
    api_pinned = {s.id: s.pinned_blocks for s in state.service.store.all()}
    problems = list(engine["problems"])
    stale = sorted(set(engine["sessions"]) - set(api_pinned))
    if stale:
        problems.append(f"engine pins sessions the API server does not know: {stale}")
    engine["api_sessions"] = api_pinned
    engine["problems"] = problems
    return JSONResponse(engine)
