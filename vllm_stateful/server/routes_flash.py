"""Flash-query and event routes of API.md, scoped to the caller's tenant:

* ``POST/GET /v1/sessions/{id}/flash_queries``, ``GET/DELETE .../{fid}``
* ``GET /v1/sessions/{id}/events`` (server-sent events via sse-starlette)

A flash query is validated like a read-only session query (vLLM's request
model, the session option allow-list, vLLM's sampling checks), greedy unless
it says otherwise, with ``max_tokens`` 1..256, and refused with 413 when it
cannot fit the session's context now.
"""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from vllm_stateful.server.durability import flash_body
from vllm_stateful.server.errors import bad_request
from vllm_stateful.server.http import guarded, validated
from vllm_stateful.server.routes_openai import chat_builder, make_params, prompt_builder, refuse_unsupported
from vllm_stateful.server.routes_sessions import own_session, session_body
from vllm_stateful.server.service import ensure_open
from vllm_stateful.server.state import StatefulState, stateful_state
from vllm_stateful.sessions.flash import FlashQuery, sampling_signature
from vllm_stateful.sessions.store import Session, SessionError

router = APIRouter()

FLASH_PATH = "/v1/sessions/{session_id}/flash_queries"
MAX_FLASH_TOKENS, DEFAULT_FLASH_TOKENS = 256, 32
# Fields of a completion request that a flash query cannot honour: answers are cached, not streamed,
# and always for one sequence; the session is named by the path.
REFUSED = (
    "stream", "stream_options", "n", "best_of", "logprobs", "top_logprobs", "prompt_logprobs", "echo",
    "max_completion_tokens", "stateful", "ark_stateful", "stateful_commit", "vllm_xargs", "request_id", "priority",
)  # fmt: skip
# Values of refused fields that change nothing (the defaults), accepted as given.
REFUSED_DEFAULTS = {"n": (None, 1), "stream": (None, False), "echo": (None, False)}
EVENT_PING_S = 15
SHUTDOWN_POLL_S = 0.5
ID_PATTERN = re.compile(r"[0-9]{1,16}")
WAIT_PATTERN = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")


@router.post(FLASH_PATH, status_code=201)
@guarded
async def register_flash_query(session_id: str, raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    body = await session_body(state, raw_request, "prompt")
    query = flash_query_of(state, body)
    ensure_open(session)
    await _check_fits(state, session, query.build_input, query.max_tokens)
    state.flash.register(session, query)
    await state.service.durable.flash(session, query.id, flash_body(query))
    return JSONResponse(query.to_public(session.version), status_code=201)


def flash_query_of(state: StatefulState, body: dict, query_id: str | None = None) -> FlashQuery:
    """A flash query from its registration body (a client's, or one saved in the state dir)."""
    body = dict(body)
    name = body.pop("name", None)
    created_at = body.pop("created_at", None)
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 128):
        raise bad_request("'name' must be a string of 1-128 characters", param="name")
    chat = "messages" in body
    if chat == ("prompt" in body):
        raise bad_request("give exactly one of 'messages' or 'prompt'")
    refused = sorted(k for k in body if k in REFUSED and body[k] not in REFUSED_DEFAULTS.get(k, (None, False)))
    if refused:
        raise bad_request(f"'{refused[0]}' is not supported on flash queries", "unsupported_in_flash_query", refused[0])
    max_tokens = body.setdefault("max_tokens", DEFAULT_FLASH_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_FLASH_TOKENS:
        raise bad_request(f"'max_tokens' must be an integer from 1 to {MAX_FLASH_TOKENS}", param="max_tokens")
    if body.get("temperature") is None:
        body.pop("temperature", None)  # greedy unless a temperature is given
    request = {"model": state.bridge.served_model_names[0], "temperature": 0.0, **body}
    parsed = validated(state.chat_request_cls if chat else state.completion_request_cls, request)
    refuse_unsupported(parsed, chat)
    if parsed.model not in state.bridge.served_model_names:
        raise SessionError(404, f"the model '{parsed.model}' does not exist", "model_not_found", param="model")
    build = chat_builder(state, request) if chat else prompt_builder(state, parsed.prompt)
    params = make_params(parsed, state, max_tokens)
    query = FlashQuery(
        name=name,
        request=body,
        max_tokens=max_tokens,
        signature=sampling_signature(params),
        build_input=build,
        make_params=lambda n: make_params(parsed, state, n),
    )
    if query_id is not None:
        query.id, query.created_at = query_id, float(created_at or query.created_at)
    return query


def restore_flash_query(state: StatefulState, session: Session, query_id: str, saved: dict) -> None:
    """Register a flash query saved in the state dir again (server/restore.py)."""
    state.flash.register(session, flash_query_of(state, saved, query_id))


async def _check_fits(state: StatefulState, session: Session, build, max_tokens: int) -> None:
    prompt_tokens = session.context_tokens + len((await build(session)).token_ids)
    if prompt_tokens + max_tokens > state.bridge.max_model_len:
        raise SessionError(
            413,
            f"the flash query needs {prompt_tokens} prompt tokens + {max_tokens} to generate, over the model's "
            f"context length of {state.bridge.max_model_len}",
            "context_length_exceeded",
        )


@router.get(FLASH_PATH)
@guarded
async def list_flash_queries(session_id: str, raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    return JSONResponse({"object": "list", "data": [q.to_public(session.version) for q in session.flash.values()]})


@router.get(FLASH_PATH + "/{flash_query_id}")
@guarded
async def get_flash_query(session_id: str, flash_query_id: str, raw_request: Request) -> Response:
    """The cached answer at once; ``?min_version=N&wait_s=T`` first waits (at most T s) for one at least
    that fresh (``wait_s`` alone: for the session's current version). ``?include_tokens=true`` adds
    ``answer_token_ids``."""
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    query = _own_query(session, flash_query_id)
    params = raw_request.query_params
    wait_s = _number(params.get("wait_s"), "wait_s", WAIT_PATTERN, state.config.flash_max_wait_s)
    min_version = _number(params.get("min_version"), "min_version", ID_PATTERN)
    if wait_s:
        target = session.version if min_version is None else int(min_version)
        await query.wait_for_version(target, wait_s, lambda: session.is_open)
        ensure_open(session)
        query = _own_query(session, flash_query_id)
    state.flash.observe_age(session, query)
    include = params.get("include_tokens", "").lower() in ("1", "true")
    return JSONResponse(query.to_public(session.version, include))


@router.delete(FLASH_PATH + "/{flash_query_id}")
@guarded
async def delete_flash_query(session_id: str, flash_query_id: str, raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    query = _own_query(session, flash_query_id)
    state.flash.unregister(session, query)
    await state.service.durable.flash(session, query.id, None)
    return JSONResponse({"id": query.id, "object": "session.flash_query.deleted", "deleted": True})


@router.get("/v1/sessions/{session_id}/events")
@guarded
async def session_events(session_id: str, raw_request: Request) -> Response:
    """``text/event-stream`` of the session's events; resume with ``Last-Event-ID`` (header or
    ``?last_event_id=``) within the replay window. Ends after the session's lifecycle event, or without
    one when the server shuts down (the client resumes elsewhere with ``Last-Event-ID``)."""
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    hub = session.events
    last = raw_request.headers.get("last-event-id") or raw_request.query_params.get("last_event_id")
    last_id = _number(last, "Last-Event-ID", ID_PATTERN)
    if len(hub.subscribers) >= hub.max_subscribers:
        raise SessionError(
            429, f"session '{session.id}' has its maximum of {hub.max_subscribers} event subscribers",
            "too_many_subscribers", retry_after=5.0,
        )  # fmt: skip
    _watch_shutdown(raw_request, state)
    metrics = state.service.metrics

    async def stream():
        # subscribed here, so that whatever ends the response (disconnect, shutdown) unsubscribes
        subscriber = hub.subscribe(None if last_id is None else int(last_id))
        metrics.event_subscribers.inc()
        try:
            while (event := await subscriber.next()) is not None:
                yield event.sse()
        finally:
            hub.unsubscribe(subscriber)
            metrics.event_subscribers.dec()

    return EventSourceResponse(stream(), ping=EVENT_PING_S)


def _watch_shutdown(raw_request: Request, state: StatefulState) -> None:
    """Once per server: when vLLM's HTTP server starts stopping (``app.state.server.should_exit``, set
    by vLLM's ``serve_http``), end every event stream, or uvicorn's graceful shutdown would wait for
    them forever."""
    if any(isinstance(t, asyncio.Task) and t.get_name() == "stream-shutdown" for t in state.tasks):
        return
    app = raw_request.app

    async def watch() -> None:
        while not getattr(getattr(app.state, "server", None), "should_exit", False):
            await asyncio.sleep(SHUTDOWN_POLL_S)
        for session in state.service.store.all():
            session.events.end_streams()

    state.tasks.append(asyncio.get_running_loop().create_task(watch(), name="stream-shutdown"))


def _own_query(session: Session, flash_query_id: str) -> FlashQuery:
    query = session.flash.get(flash_query_id)
    if query is None:
        raise SessionError(404, f"flash query '{flash_query_id[:64]}' not found", "flash_query_not_found")
    return query


def _number(raw: str | None, name: str, pattern: re.Pattern, high: float | None = None) -> float | None:
    """A non-negative decimal query value (digits only: no signs, exponents, '_' or huge numbers)."""
    if raw is None:
        return None
    if not pattern.fullmatch(raw):
        raise bad_request(f"'{name}' must be a non-negative decimal number", param=name)
    value = float(raw)
    if high is not None and value > high:
        raise bad_request(f"'{name}' must be at most {high}", param=name)
    return value
