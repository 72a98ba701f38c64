"""A session's event stream (``GET /v1/sessions/{id}/events``), HTTP-free.

Contract:
* ``publish`` never blocks and never fails: every subscriber has a bounded
  buffer; when a subscriber is too slow, its oldest undelivered events are
  dropped and it next receives a ``lagged`` event saying how many it missed.
  A slow client therefore costs the server at most ``buffer`` events.
* Event ids are integers, unique in the process and increasing within a
  stream: each hub (session incarnation) numbers its events consecutively
  from its own base (``ID_STRIDE`` apart), so ``Last-Event-ID`` identifies one
  point of one stream and the number of events a client lost is exact. A
  subscriber that resumes from an id still in the session's replay window
  (``replay`` events) gets every later event first; one whose id fell out of
  the window gets ``lagged`` with the count, then what the window holds. An
  id from another stream (an earlier incarnation) resumes from the start.
* A subscriber to a stream that already ended gets its final event.
* ``close(event)`` publishes a final lifecycle event (``closed``,
  ``expired``, ``failed``) and ends every stream after it.
No vLLM import; single-threaded asyncio.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

_bases = itertools.count(1)
ID_STRIDE = 1 << 24  # events per base: ids stay below 2**53 for 2**29 hubs (exact in JavaScript too)
LAGGED = "lagged"


@dataclass(frozen=True)
class Event:
    id: int | None  # None: not a point to resume from (``lagged``)
    name: str
    data: dict[str, Any]

    def sse(self) -> dict[str, str]:
        """The event as sse-starlette's EventSourceResponse takes it."""
        body = {"event": self.name, "data": json.dumps(self.data, separators=(",", ":"))}
        return body if self.id is None else {"id": str(self.id), **body}


class Subscriber:
    def __init__(self, buffer: int) -> None:
        self._events: deque[Event] = deque()
        self._buffer = buffer
        self._missed = 0
        self._ready = asyncio.Event()
        self.ended = False

    def offer(self, event: Event) -> None:
        if len(self._events) >= self._buffer:
            self._events.popleft()
            self._missed += 1
        self._events.append(event)
        self._ready.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    def missed(self, n: int) -> None:
        self._missed += n

    async def next(self) -> Event | None:
        """The next event (``lagged`` first when events were dropped); None once ended and drained."""
        while True:
            if self._missed:
                lagged, self._missed = Event(None, LAGGED, {"missed": self._missed}), 0
                return lagged
            if self._events:
                return self._events.popleft()
            if self.ended:
                return None
            self._ready.clear()
            await self._ready.wait()


class SessionEvents:
    """One session incarnation's event hub."""

    def __init__(self, replay: int, buffer: int, max_subscribers: int) -> None:
        self._base = next(_bases) * ID_STRIDE
        self._next = self._first = self._base + 1  # the id of the next event, and of the first
        self._final: Event | None = None
        self._replay: deque[Event] = deque(maxlen=replay)
        self._buffer = buffer
        self.max_subscribers = max_subscribers
        self.subscribers: set[Subscriber] = set()
        self.closed = False

    def publish(self, name: str, data: dict[str, Any]) -> Event | None:
        if self.closed:
            return None
        if self._next >= self._base + ID_STRIDE:  # a long stream moves on to a fresh range (still increasing)
            self._base = next(_bases) * ID_STRIDE
            self._next = self._base + 1
        event = Event(self._next, name, data)
        self._next += 1
        self._replay.append(event)
        for sub in self.subscribers:
            sub.offer(event)
        return event

    def subscribe(self, last_event_id: int | None = None) -> Subscriber:
        """A new subscriber, primed with the replay after ``last_event_id`` (caller checks the limit)."""
        sub = Subscriber(self._buffer)
        if last_event_id is not None:
            held = list(self._replay)
            ours = self._first <= last_event_id < self._next
            after = last_event_id if ours else self._first - 1  # another stream's id: from the start
            if held and held[0].id > after + 1:
                sub.missed(held[0].id - after - 1)
            for event in held:
                if event.id > after:
                    sub.offer(event)
        elif self._final is not None:
            sub.offer(self._final)
        if self.closed:
            sub.end()
        else:
            self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def end_streams(self) -> None:
        """End every open stream without a lifecycle event (the server is shutting down)."""
        for sub in self.subscribers:
            sub.end()

    def close(self, name: str, data: dict[str, Any]) -> None:
        """Publish the final lifecycle event and end every stream."""
        if self.closed:
            return
        self._final = self.publish(name, data)
        self.closed = True
        for sub in self.subscribers:
            sub.end()
        self.subscribers.clear()
