"""A small typed client (httpx; sync and async) for the vllm-stateful routes the ``openai`` SDK cannot reach:
sessions (create, list, get, delete, append), flash queries, and a session's server-sent event stream.

Chat and completions stay with the plain ``openai`` SDK: pass ``extra_body={"stateful": session_id}``.

    with StatefulClient("http://127.0.0.1:8000/v1") as client:
        session = client.create_session(prompt="price feed:\\n")
        client.append(session.id, text="t=1 price=100\\n")
        for event in client.events(session.id):  # ends after the session's closed/expired/failed event
            print(event.name, event.data)

``AsyncStatefulClient`` has the same methods as coroutines (``events`` is an async iterator). Non-2xx answers
raise ``StatefulError``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import quote

import httpx

Prompt = str | list[int]  # text, or token ids
Messages = list[dict[str, Any]]  # chat messages, rendered with the model's chat template
TERMINAL_EVENTS = frozenset({"closed", "expired", "failed"})  # lifecycle events; the stream ends after one


@dataclass(eq=False)
class StatefulError(Exception):
    """A non-2xx answer: the server's ``{"error": {...}}`` body, and ``Retry-After`` (seconds) when sent."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None
    type: str | None = None

    def __str__(self) -> str:
        return f"HTTP {self.status} ({self.code}): {self.message}"


def _from(cls: Any, body: dict[str, Any]) -> Any:
    """The dataclass from a JSON object: known fields typed, the whole object kept in ``raw``."""
    names = {f.name for f in fields(cls)} - {"raw"}
    return cls(**{k: v for k, v in body.items() if k in names}, raw=dict(body))


@dataclass(frozen=True)
class Session:
    id: str
    object: str = "session"
    version: int = 0
    context_tokens: int = 0
    pinned_blocks: int = 0
    state: str = ""
    created_at: float = 0.0
    last_used_at: float = 0.0
    ttl_s: float | None = None
    queued_tokens: int = 0
    flash_queries: list[str] = field(default_factory=list)
    token_ids: list[int] | None = None  # only with include_tokens=True
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class FlashQuery:
    """A registered flash query and its latest cached answer (``answer`` is None until first computed)."""

    id: str
    object: str = "session.flash_query"
    name: str | None = None
    created_at: float = 0.0
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 32
    answer: str | None = None
    version: int | None = None  # the session version the answer was computed at
    computed_at: float | None = None
    stale: bool = False
    confidence: float | None = None
    finish_reason: str | None = None
    evaluations: int = 0
    error: Any = None
    answer_token_ids: list[int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


FlashAnswer = FlashQuery  # the same object: a flash query is read for its answer


@dataclass(frozen=True)
class Deleted:
    id: str
    object: str = ""
    deleted: bool = True
    freed_blocks: int | None = None  # sessions only
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class AppendResult:
    id: str
    version: int  # the session version this append made
    queued_tokens: int
    ingested: bool  # True only for wait=True once the text is in the session's KV
    session: Session | None = None  # the session object, when ingested


@dataclass(frozen=True)
class Event:
    id: int | None  # None for ``lagged``
    name: str
    data: dict[str, Any]


class SSEParser:
    """Standard server-sent-events framing, one line at a time; ``feed`` returns an event on a blank line."""

    def __init__(self) -> None:
        self._name: str = ""
        self._id: int | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        line = line.rstrip("\r\n")
        if not line:
            name, data, event_id = self._name or "message", self._data, self._id
            self._name, self._data, self._id = "", [], None
            if not data:
                return None
            text = "\n".join(data)
            try:
                body = json.loads(text)
            except ValueError:
                body = {"data": text}
            return Event(event_id, name, body if isinstance(body, dict) else {"data": body})
        if line.startswith(":"):
            return None  # comment / ping
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            self._name = value
        elif key == "data":
            self._data.append(value)
        elif key == "id" and value.isdigit():
            self._id = int(value)
        return None


@dataclass(frozen=True)
class _Req:
    method: str
    path: str
    parse: Callable[[Any, int], Any]  # (JSON body, status) -> result
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    wait_s: float = 0.0  # added to the read timeout


def _q(part: str) -> str:
    return quote(part, safe="")


def _body(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _one_of(what: str, **kw: Any) -> dict[str, Any]:
    given = _body(**kw)
    if len(given) != 1:
        raise ValueError(f"{what}: give exactly one of {', '.join(kw)}")
    return given


def _as(cls: type) -> Callable[[Any, int], Any]:
    return lambda body, _: _from(cls, body)


def _listed(cls: type) -> Callable[[Any, int], list[Any]]:
    return lambda body, _: [_from(cls, x) for x in body["data"]]


def _appended(body: Any, status: int) -> AppendResult:
    if status == 200:  # wait=True and ingested: the session object
        return AppendResult(body["id"], body["version"], body.get("queued_tokens", 0), True, _from(Session, body))
    return AppendResult(body["id"], body["version"], body["queued_tokens"], bool(body.get("ingested", False)))


def _sessions(sid: str) -> str:
    return f"/sessions/{_q(sid)}"


def _flash_path(sid: str, fid: str | None = None) -> str:
    return f"{_sessions(sid)}/flash_queries" + (f"/{_q(fid)}" if fid is not None else "")


class _R:
    """The request for each method, shared by both clients."""

    @staticmethod
    def create_session(id, ttl_s, prompt, messages) -> _Req:
        if prompt is not None and messages is not None:
            raise ValueError("create_session: give prompt or messages, not both")
        return _Req("POST", "/sessions", _as(Session), _body(id=id, ttl_s=ttl_s, prompt=prompt, messages=messages))

    list_sessions = staticmethod(lambda: _Req("GET", "/sessions", _listed(Session)))
    delete_session = staticmethod(lambda sid: _Req("DELETE", _sessions(sid), _as(Deleted)))
    list_flash_queries = staticmethod(lambda sid: _Req("GET", _flash_path(sid), _listed(FlashQuery)))
    delete_flash_query = staticmethod(lambda sid, fid: _Req("DELETE", _flash_path(sid, fid), _as(Deleted)))

    @staticmethod
    def get_session(sid, include_tokens) -> _Req:
        return _Req("GET", _sessions(sid), _as(Session), params={"include_tokens": "true"} if include_tokens else None)

    @staticmethod
    def append(sid, text, token_ids, messages, wait) -> _Req:
        body = {**_one_of("append", text=text, token_ids=token_ids, messages=messages), "wait": wait}
        return _Req("POST", f"{_sessions(sid)}/append", _appended, body)

    @staticmethod
    def register_flash_query(sid, prompt, messages, max_tokens, name, sampling) -> _Req:
        body = {**_body(name=name), **_one_of("register_flash_query", prompt=prompt, messages=messages)}
        return _Req("POST", _flash_path(sid), _as(FlashQuery), {**body, "max_tokens": max_tokens, **sampling})

    @staticmethod
    def get_flash_query(sid, fid, min_version, wait_s, include_tokens) -> _Req:
        params = _body(min_version=min_version, wait_s=wait_s, include_tokens="true" if include_tokens else None)
        return _Req("GET", _flash_path(sid, fid), _as(FlashQuery), params=params or None, wait_s=wait_s or 0.0)


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        err = None
    err = err if isinstance(err, dict) else {"message": resp.text or resp.reason_phrase}
    try:
        retry_after = float(resp.headers["retry-after"]) if "retry-after" in resp.headers else None
    except ValueError:
        retry_after = None
    message = str(err.get("message") or resp.reason_phrase)
    raise StatefulError(resp.status_code, message, err.get("code"), err.get("param"), retry_after, err.get("type"))


class _Base:
    def __init__(self, base_url: str, api_key: str | None, http: Any, owns: bool) -> None:
        self.base_url, self._http, self._owns = base_url.rstrip("/"), http, owns
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.last_event_ids: dict[str, int] = {}  # session id -> last event id seen by events()

    def _kwargs(self, req: _Req) -> dict[str, Any]:
        kw: dict[str, Any] = {"json": req.json, "params": req.params, "headers": self._headers}
        if req.wait_s:
            t = self._http.timeout
            kw["timeout"] = httpx.Timeout(
                t.connect, read=None if t.read is None else t.read + req.wait_s, write=t.write, pool=t.pool
            )
        return kw

    def _events_args(self, sid: str, last_event_id: int | None) -> tuple[str, dict[str, str]]:
        headers = {**self._headers, "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        return f"{self.base_url}{_sessions(sid)}/events", headers

    def _seen(self, sid: str, event: Event) -> Event:
        if event.id is not None:
            self.last_event_ids[sid] = event.id
        return event


class StatefulClient(_Base):
    """Synchronous client; ``base_url`` like ``http://127.0.0.1:8000/v1``. Pass ``http`` to reuse a client."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float = 60.0, http: httpx.Client | None = None
    ) -> None:
        super().__init__(base_url, api_key, http or httpx.Client(timeout=timeout), http is None)

    def _call(self, req: _Req) -> Any:
        resp = self._http.request(req.method, self.base_url + req.path, **self._kwargs(req))
        _raise_for(resp)
        return req.parse(resp.json(), resp.status_code)

    def create_session(
        self,
        *,
        id: str | None = None,
        prompt: Prompt | None = None,
        messages: Messages | None = None,
        ttl_s: float | None = None,
    ) -> Session:
        return self._call(_R.create_session(id, ttl_s, prompt, messages))

    def list_sessions(self) -> list[Session]:
        return self._call(_R.list_sessions())

    def get_session(self, session_id: str, include_tokens: bool = False) -> Session:
        return self._call(_R.get_session(session_id, include_tokens))

    def delete_session(self, session_id: str) -> Deleted:
        return self._call(_R.delete_session(session_id))

    def append(
        self,
        session_id: str,
        *,
        text: str | None = None,
        token_ids: list[int] | None = None,
        messages: Messages | None = None,
        wait: bool = False,
    ) -> AppendResult:
        return self._call(_R.append(session_id, text, token_ids, messages, wait))

    def register_flash_query(
        self,
        session_id: str,
        *,
        prompt: Prompt | None = None,
        messages: Messages | None = None,
        max_tokens: int = 32,
        name: str | None = None,
        **sampling: Any,
    ) -> FlashQuery:
        return self._call(_R.register_flash_query(session_id, prompt, messages, max_tokens, name, sampling))

    def list_flash_queries(self, session_id: str) -> list[FlashQuery]:
        return self._call(_R.list_flash_queries(session_id))

    def get_flash_query(
        self,
        session_id: str,
        flash_query_id: str,
        min_version: int | None = None,
        wait_s: float | None = None,
        include_tokens: bool = False,
    ) -> FlashQuery:
        return self._call(_R.get_flash_query(session_id, flash_query_id, min_version, wait_s, include_tokens))

    def delete_flash_query(self, session_id: str, flash_query_id: str) -> Deleted:
        return self._call(_R.delete_flash_query(session_id, flash_query_id))

    def events(self, session_id: str, last_event_id: int | None = None) -> Iterator[Event]:
        """The session's events until the stream ends (after closed/expired/failed). Resume a broken stream with
        ``last_event_id=client.last_event_ids[session_id]``."""
        url, headers = self._events_args(session_id, last_event_id)
        with self._http.stream("GET", url, headers=headers) as resp:
            if not resp.is_success:
                resp.read()
                _raise_for(resp)
            parser = SSEParser()
            for line in resp.iter_lines():
                if (event := parser.feed(line)) is not None:
                    yield self._seen(session_id, event)
                    if event.name in TERMINAL_EVENTS:
                        return

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> StatefulClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStatefulClient(_Base):
    """The same methods as ``StatefulClient``, as coroutines; ``events`` is an async iterator."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float = 60.0, http: httpx.AsyncClient | None = None
    ) -> None:
        super().__init__(base_url, api_key, http or httpx.AsyncClient(timeout=timeout), http is None)

    async def _call(self, req: _Req) -> Any:
        resp = await self._http.request(req.method, self.base_url + req.path, **self._kwargs(req))
        _raise_for(resp)
        return req.parse(resp.json(), resp.status_code)

    async def create_session(
        self,
        *,
        id: str | None = None,
        prompt: Prompt | None = None,
        messages: Messages | None = None,
        ttl_s: float | None = None,
    ) -> Session:
        return await self._call(_R.create_session(id, ttl_s, prompt, messages))

    async def list_sessions(self) -> list[Session]:
        return await self._call(_R.list_sessions())

    async def get_session(self, session_id: str, include_tokens: bool = False) -> Session:
        return await self._call(_R.get_session(session_id, include_tokens))

    async def delete_session(self, session_id: str) -> Deleted:
        return await self._call(_R.delete_session(session_id))

    async def append(
        self,
        session_id: str,
        *,
        text: str | None = None,
        token_ids: list[int] | None = None,
        messages: Messages | None = None,
        wait: bool = False,
    ) -> AppendResult:
        return await self._call(_R.append(session_id, text, token_ids, messages, wait))

    async def register_flash_query(
        self,
        session_id: str,
        *,
        prompt: Prompt | None = None,
        messages: Messages | None = None,
        max_tokens: int = 32,
        name: str | None = None,
        **sampling: Any,
    ) -> FlashQuery:
        return await self._call(_R.register_flash_query(session_id, prompt, messages, max_tokens, name, sampling))

    async def list_flash_queries(self, session_id: str) -> list[FlashQuery]:
        return await self._call(_R.list_flash_queries(session_id))

    async def get_flash_query(
        self,
        session_id: str,
        flash_query_id: str,
        min_version: int | None = None,
        wait_s: float | None = None,
        include_tokens: bool = False,
    ) -> FlashQuery:
        return await self._call(_R.get_flash_query(session_id, flash_query_id, min_version, wait_s, include_tokens))

    async def delete_flash_query(self, session_id: str, flash_query_id: str) -> Deleted:
        return await self._call(_R.delete_flash_query(session_id, flash_query_id))

    async def events(self, session_id: str, last_event_id: int | None = None) -> AsyncIterator[Event]:
        url, headers = self._events_args(session_id, last_event_id)
        async with self._http.stream("GET", url, headers=headers) as resp:
            if not resp.is_success:
                await resp.aread()
                _raise_for(resp)
            parser = SSEParser()
            async for line in resp.aiter_lines():
                if (event := parser.feed(line)) is not None:
                    yield self._seen(session_id, event)
                    if event.name in TERMINAL_EVENTS:
                        return

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncStatefulClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
