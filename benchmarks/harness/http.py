"""HTTP with an OpenAI-compatible server, as every benchmark client needs it.

``stream_completion`` (sync, httpx) and ``astream_completion`` (async) send one streamed
``/v1/completions`` request with ``stream_options.include_usage`` and return a ``Streamed``: latency
to the last byte, time to the first chunk with a choice, the final ``usage``, the ``session`` object
vllm-stateful adds (None on stock vLLM) and the generated text. A status other than 200 raises
``BenchError`` with the body.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


class BenchError(RuntimeError):
    """A server answered something the benchmark cannot use (status, missing field)."""


@dataclass
class Streamed:
    latency_s: float
    ttft_s: float | None
    usage: dict[str, Any] = field(default_factory=dict)
    session: dict[str, Any] | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # with "return_token_ids": true


def check(resp: httpx.Response, *ok: int) -> dict[str, Any]:
    """The JSON body when the status is one of ``ok`` (default 200); else ``BenchError``."""
    if resp.status_code not in (ok or (200,)):
        raise BenchError(f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {resp.text[:500]}")
    return resp.json()


def retry_after(resp: httpx.Response, default: float = 0.2) -> float:
    """The response's ``Retry-After`` in seconds, clamped to 0.01..5."""
    try:
        return min(max(float(resp.headers.get("retry-after", default)), 0.01), 5.0)
    except ValueError:
        return default


def streaming_body(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """Greedy, ``ignore_eos`` (every answer decodes the same count) unless ``body`` says otherwise."""
    return {
        "model": model,
        "temperature": 0,
        "ignore_eos": True,
        **body,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class _Reader:
    """Folds the SSE lines of one completion into a ``Streamed``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.out = Streamed(0.0, None)
        self.parts: list[str] = []

    def line(self, line: str) -> None:
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            return
        chunk = json.loads(line[5:])
        choices = chunk.get("choices") or []
        if choices and self.out.ttft_s is None:
            self.out.ttft_s = time.perf_counter() - self.t0
        self.parts += [c.get("text") or "" for c in choices]
        self.out.token_ids += [t for c in choices for t in (c.get("token_ids") or [])]
        self.out.usage = chunk.get("usage") or self.out.usage
        self.out.session = chunk.get("session") or self.out.session

    def done(self) -> Streamed:
        self.out.latency_s = time.perf_counter() - self.t0
        self.out.text = "".join(self.parts)
        return self.out


def stream_completion(client: httpx.Client, api_base: str, body: dict[str, Any], model: str | None) -> Streamed:
    reader = _Reader()
    with client.stream("POST", f"{api_base}/completions", json=streaming_body(body, model)) as resp:
        if resp.status_code != 200:
            resp.read()
            check(resp, 200)
        for line in resp.iter_lines():
            reader.line(line)
    return reader.done()


async def astream_completion(
    client: httpx.AsyncClient,
    api_base: str,
    body: dict[str, Any],
    model: str | None,
    received: asyncio.Event | None = None,
) -> Streamed:
    """As ``stream_completion``; sets ``received`` once the response headers arrive."""
    reader = _Reader()
    async with client.stream("POST", f"{api_base}/completions", json=streaming_body(body, model)) as resp:
        if received is not None:
            received.set()
        if resp.status_code != 200:
            await resp.aread()
            check(resp, 200)
        async for line in resp.aiter_lines():
            reader.line(line)
    return reader.done()


def post_timed(
    client: Any, url: str, body: dict[str, Any], *ok: int, timeout: float | None = None
) -> tuple[float, dict[str, Any]]:
    """POST ``body`` with ``client`` (an ``httpx.Client``, or the ``httpx`` module for a one-off
    connection); (seconds to the full response, its JSON). Raises ``BenchError`` on another status."""
    t0 = time.perf_counter()
    resp = client.post(url, json=body, **({} if timeout is None else {"timeout": timeout}))
    return time.perf_counter() - t0, check(resp, *(ok or (200,)))


def append_wait(client: httpx.Client, url: str, token_ids: list[int]) -> tuple[float, dict[str, Any]]:
    """Append ``token_ids`` to a vllm-stateful session (``url`` ends in ``/append``) with ``wait: true``;
    (seconds, body). 200: ingested; 202: acknowledged but still queued behind a backlog."""
    return post_timed(client, url, {"token_ids": token_ids, "wait": True}, 200, 202)
