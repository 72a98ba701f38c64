"""``vllm_stateful.client`` against ``httpx.MockTransport``: the requests it builds and how it parses answers."""

import asyncio
import json

import httpx
import pytest

from vllm_stateful.client import (
    AppendResult,
    AsyncStatefulClient,
    Event,
    FlashQuery,
    Session,
    SSEParser,
    StatefulClient,
    StatefulError,
)

pytestmark = pytest.mark.unit

BASE = "http://server:8000/v1"
SESSION = {
    "id": "s1",
    "object": "session",
    "version": 3,
    "context_tokens": 40,
    "pinned_blocks": 3,
    "state": "idle",
    "created_at": 1.0,
    "last_used_at": 2.0,
    "ttl_s": 600.0,
    "queued_tokens": 0,
    "flash_queries": ["fq_1"],
    "tenant": "t-extra",  # a field the client does not know: kept in ``raw``
}
FLASH = {
    "id": "fq_1",
    "object": "session.flash_query",
    "name": "trend",
    "created_at": 1.5,
    "prompt": "\nQ: up?\nA:",
    "max_tokens": 16,
    "answer": " up",
    "version": 3,
    "computed_at": 2.5,
    "stale": False,
    "confidence": 0.75,
    "finish_reason": "length",
    "evaluations": 2,
}


class Server:
    """Answers each request from ``responses`` (in order) and keeps what it was sent."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses, self.requests = list(responses), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.responses.pop(0)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self, i: int = -1):
        return json.loads(self.requests[i].content)


def client(*responses: httpx.Response, api_key: str | None = "sk-test") -> tuple[StatefulClient, Server]:
    server = Server(*responses)
    return StatefulClient(BASE, api_key=api_key, http=httpx.Client(transport=httpx.MockTransport(server))), server


def aclient(*responses: httpx.Response) -> tuple[AsyncStatefulClient, Server]:
    server = Server(*responses)
    http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    return AsyncStatefulClient(BASE, api_key="sk-test", http=http), server


def ok(body, status: int = 200, **kw) -> httpx.Response:
    return httpx.Response(status, json=body, **kw)


def sse(text: str, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=text.encode(), headers={"content-type": "text/event-stream"})


# -- requests built and answers parsed ----------------------------------------------------------------------------


def test_create_session_sends_body_and_auth_and_parses_the_session():
    c, server = client(ok(SESSION, 201))
    session = c.create_session(id="s1", prompt="feed:\n", ttl_s=600)
    req = server.last
    assert (req.method, str(req.url)) == ("POST", f"{BASE}/sessions")
    assert req.headers["authorization"] == "Bearer sk-test"
    assert server.body() == {"id": "s1", "ttl_s": 600, "prompt": "feed:\n"}
    assert isinstance(session, Session)
    assert (session.id, session.version, session.flash_queries, session.ttl_s) == ("s1", 3, ["fq_1"], 600.0)
    assert session.raw["tenant"] == "t-extra" and session.token_ids is None


def test_create_session_with_token_prompt_or_messages_and_no_api_key():
    c, server = client(ok(SESSION, 201), ok(SESSION, 201), api_key=None)
    c.create_session(prompt=[1, 2, 3])
    assert server.body() == {"prompt": [1, 2, 3]} and "authorization" not in server.last.headers
    c.create_session(messages=[{"role": "system", "content": "hi"}])
    assert server.body() == {"messages": [{"role": "system", "content": "hi"}]}
    with pytest.raises(ValueError):
        c.create_session(prompt="a", messages=[{"role": "user", "content": "b"}])
    assert len(server.requests) == 2


def test_list_get_and_delete_session():
    deleted = {"id": "s1", "object": "session.deleted", "deleted": True, "freed_blocks": 3}
    c, server = client(
        ok({"object": "list", "data": [SESSION, {**SESSION, "id": "s2"}]}),
        ok({**SESSION, "token_ids": [5, 6]}),
        ok(SESSION),
        ok(deleted),
    )
    assert [s.id for s in c.list_sessions()] == ["s1", "s2"]
    assert (server.last.method, server.last.url.path) == ("GET", "/v1/sessions")
    assert c.get_session("s1", include_tokens=True).token_ids == [5, 6]
    assert (server.last.url.path, dict(server.last.url.params)) == ("/v1/sessions/s1", {"include_tokens": "true"})
    c.get_session("s1")
    assert not server.last.url.params
    gone = c.delete_session("s1")
    assert (server.last.method, server.last.url.path) == ("DELETE", "/v1/sessions/s1")
    assert (gone.id, gone.deleted, gone.freed_blocks, gone.object) == ("s1", True, 3, "session.deleted")


def test_session_ids_are_quoted_in_paths():
    c, server = client(ok(SESSION))
    c.get_session("a/b c")
    assert server.last.url.raw_path == b"/v1/sessions/a%2Fb%20c"


def test_append_bodies_and_results():
    accepted = {"id": "s1", "version": 4, "queued_tokens": 7}
    c, server = client(
        ok(accepted, 202),
        ok(accepted, 202),
        ok({**SESSION, "version": 4}),
        ok({**accepted, "ingested": False}, 202),
    )
    assert c.append("s1", text="t=1 price=10\n") == AppendResult("s1", 4, 7, False)
    assert (server.last.method, server.last.url.path) == ("POST", "/v1/sessions/s1/append")
    assert server.body() == {"text": "t=1 price=10\n", "wait": False}
    c.append("s1", token_ids=[1, 2])
    assert server.body() == {"token_ids": [1, 2], "wait": False}
    done = c.append("s1", messages=[{"role": "user", "content": "x"}], wait=True)
    assert server.body() == {"messages": [{"role": "user", "content": "x"}], "wait": True}
    assert done.ingested and done.version == 4 and done.session is not None and done.session.context_tokens == 40
    backlog = c.append("s1", text="more", wait=True)  # acknowledged, still queued
    assert (backlog.ingested, backlog.queued_tokens, backlog.session) == (False, 7, None)


@pytest.mark.parametrize("kwargs", [{}, {"text": "a", "token_ids": [1]}, {"text": "a", "messages": []}])
def test_append_needs_exactly_one_content(kwargs):
    c, server = client()
    with pytest.raises(ValueError):
        c.append("s1", **kwargs)
    assert not server.requests


def test_register_flash_query_body():
    c, server = client(ok({**FLASH, "answer": None, "version": None, "computed_at": None}, 201))
    fq = c.register_flash_query("s1", prompt="\nQ: up?\nA:", max_tokens=16, name="trend", temperature=0, stop=["\n"])
    assert (server.last.method, server.last.url.path) == ("POST", "/v1/sessions/s1/flash_queries")
    assert server.body() == {
        "name": "trend",
        "prompt": "\nQ: up?\nA:",
        "max_tokens": 16,
        "temperature": 0,
        "stop": ["\n"],
    }
    assert isinstance(fq, FlashQuery) and fq.answer is None and fq.version is None and fq.name == "trend"


def test_register_flash_query_defaults_and_validation():
    c, server = client(ok(FLASH, 201))
    c.register_flash_query("s1", messages=[{"role": "user", "content": "q"}])
    assert server.body() == {"messages": [{"role": "user", "content": "q"}], "max_tokens": 32}
    for kwargs in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "q"}]}):
        with pytest.raises(ValueError):
            c.register_flash_query("s1", **kwargs)
    assert len(server.requests) == 1


def test_list_get_and_delete_flash_queries():
    c, server = client(
        ok({"object": "list", "data": [FLASH]}),
        ok({**FLASH, "answer_token_ids": [9, 10]}),
        ok(FLASH),
        ok({"id": "fq_1", "object": "session.flash_query.deleted", "deleted": True}),
    )
    [fq] = c.list_flash_queries("s1")
    assert server.last.url.path == "/v1/sessions/s1/flash_queries"
    assert (fq.answer, fq.version, fq.confidence, fq.stale, fq.evaluations) == (" up", 3, 0.75, False, 2)
    got = c.get_flash_query("s1", "fq_1", min_version=3, wait_s=30, include_tokens=True)
    assert server.last.url.path == "/v1/sessions/s1/flash_queries/fq_1"
    assert dict(server.last.url.params) == {"min_version": "3", "wait_s": "30", "include_tokens": "true"}
    assert server.last.extensions["timeout"]["read"] == 5.0 + 30  # httpx's default read, plus the server-side wait
    assert got.answer_token_ids == [9, 10]
    c.get_flash_query("s1", "fq_1")
    assert not server.last.url.params and server.last.extensions["timeout"]["read"] == 5.0  # httpx's default
    gone = c.delete_flash_query("s1", "fq_1")
    assert (server.last.method, server.last.url.path) == ("DELETE", "/v1/sessions/s1/flash_queries/fq_1")
    assert gone.deleted and gone.object == "session.flash_query.deleted" and gone.freed_blocks is None


# -- errors ------------------------------------------------------------------------------------------------------


def error(status: int, code: str, message: str = "nope", param=None, **kw) -> httpx.Response:
    return ok(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}, status, **kw
    )


@pytest.mark.parametrize("status,code", [(400, "invalid_value"), (404, "not_found"), (409, "conflict"), (413, "x")])
def test_errors_map_to_stateful_error(status, code):
    c, _ = client(error(status, code, "bad thing", param="ttl_s"))
    with pytest.raises(StatefulError) as info:
        c.create_session(ttl_s=-1)
    err = info.value
    assert (err.status, err.code, err.message, err.param, err.retry_after) == (status, code, "bad thing", "ttl_s", None)
    assert err.type == "invalid_request_error" and str(status) in str(err) and "bad thing" in str(err)


def test_retry_after_is_read_from_the_header():
    c, _ = client(error(429, "rate_limited", headers={"Retry-After": "2"}), httpx.Response(503, text="overloaded"))
    with pytest.raises(StatefulError) as info:
        c.append("s1", text="x")
    assert (info.value.status, info.value.code, info.value.retry_after) == (429, "rate_limited", 2.0)
    with pytest.raises(StatefulError) as info:  # a body that is not the JSON error shape
        c.list_sessions()
    assert (info.value.status, info.value.code, info.value.message) == (503, None, "overloaded")


# -- server-sent events ------------------------------------------------------------------------------------------

STREAM = (
    ": ping - 2024-01-01\r\n\r\n"
    'id: 1\r\nevent: appended\r\ndata: {"version": 4, "context_tokens": 50}\r\n\r\n'
    'event: lagged\ndata: {"missed": 3}\n\n'
    "id: 5\nevent: flash_answer\n"
    'data: {"flash_query_id": "fq_1", "name": "trend",\n'
    'data:  "version": 4, "answer": " up", "confidence": 0.5, "finish_reason": "length"}\n\n'
    ": keep-alive\n"
    'id: 6\nevent: closed\ndata: {"reason": "deleted"}\n\n'
    'id: 7\nevent: appended\ndata: {"version": 9}\n\n'  # after the lifecycle event: never read
)
EXPECTED = [
    Event(1, "appended", {"version": 4, "context_tokens": 50}),
    Event(None, "lagged", {"missed": 3}),
    Event(
        5,
        "flash_answer",
        {
            "flash_query_id": "fq_1",
            "name": "trend",
            "version": 4,
            "answer": " up",
            "confidence": 0.5,
            "finish_reason": "length",
        },
    ),
    Event(6, "closed", {"reason": "deleted"}),
]


def test_sse_parser_framing():
    parser = SSEParser()
    lines = [": comment", "event: x", "data: a", "data:b", "id: 2", "", "event: empty", "", "data: [1]", "retry: 5", ""]
    events = [e for e in map(parser.feed, lines) if e is not None]
    assert events == [Event(2, "x", {"data": "a\nb"}), Event(None, "message", {"data": [1]})]


def test_events_stream_parses_and_stops_after_lifecycle_event():
    c, server = client(sse(STREAM))
    assert list(c.events("s1")) == EXPECTED
    req = server.last
    assert (req.method, req.url.path) == ("GET", "/v1/sessions/s1/events")
    assert req.headers["authorization"] == "Bearer sk-test" and "last-event-id" not in req.headers
    assert c.last_event_ids == {"s1": 6}


def test_events_resume_and_end_with_the_stream():
    c, server = client(sse('id: 8\nevent: appended\ndata: {"version": 5}\n\nid: 9\nevent: appended\n'))
    assert list(c.events("s1", last_event_id=7)) == [Event(8, "appended", {"version": 5})]  # unterminated: dropped
    assert server.last.headers["last-event-id"] == "7"
    assert c.last_event_ids["s1"] == 8


def test_events_error_is_raised():
    c, _ = client(error(429, "too_many_subscribers", headers={"Retry-After": "1"}))
    with pytest.raises(StatefulError) as info:
        next(c.events("s1"))
    assert (info.value.status, info.value.code, info.value.retry_after) == (429, "too_many_subscribers", 1.0)


# -- async parity and lifetime -------------------------------------------------------------------------------------


def test_async_client_builds_the_same_requests():
    async def main():
        c, server = aclient(ok(SESSION, 201), ok({"id": "s1", "version": 4, "queued_tokens": 2}, 202), ok(FLASH))
        async with c:
            session = await c.create_session(prompt="feed:\n")
            assert (server.last.method, str(server.last.url), server.body()) == (
                "POST",
                f"{BASE}/sessions",
                {"prompt": "feed:\n"},
            )
            assert server.last.headers["authorization"] == "Bearer sk-test"
            assert await c.append(session.id, text="x") == AppendResult("s1", 4, 2, False)
            assert server.body() == {"text": "x", "wait": False}
            fq = await c.get_flash_query("s1", "fq_1", min_version=4, wait_s=10)
            assert dict(server.last.url.params) == {"min_version": "4", "wait_s": "10"} and fq.answer == " up"
            with pytest.raises(ValueError):
                await c.append("s1")

    asyncio.run(main())


def test_async_events_and_errors():
    async def main():
        c, server = aclient(sse(STREAM), error(404, "not_found"))
        assert [e async for e in c.events("s1", last_event_id=0)] == EXPECTED
        assert server.last.headers["last-event-id"] == "0" and c.last_event_ids == {"s1": 6}
        with pytest.raises(StatefulError) as info:
            await c.get_session("gone")
        assert (info.value.status, info.value.code) == (404, "not_found")
        await c.aclose()

    asyncio.run(main())


def test_context_manager_closes_only_its_own_http_client():
    with StatefulClient(BASE) as owned:
        pass
    assert owned._http.is_closed
    shared = httpx.Client(transport=httpx.MockTransport(Server()))
    with StatefulClient(BASE, http=shared):
        pass
    assert not shared.is_closed
