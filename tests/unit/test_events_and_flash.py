"""Pure logic of session events, flash-query records and the engine's flash hold (no engine)."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

from vllm_stateful.sessions.events import SessionEvents
from vllm_stateful.sessions.flash import FlashAnswer, FlashQuery, confidence_of, sampling_signature


async def _drain(sub) -> list:
    out = []
    while (event := await asyncio.wait_for(sub.next(), 1)) is not None:
        out.append(event)
    return out


def test_a_slow_subscriber_loses_the_oldest_events_and_is_told_how_many():
    async def run():
        hub = SessionEvents(replay=16, buffer=3, max_subscribers=4)
        slow = hub.subscribe()
        for v in range(10):
            hub.publish("appended", {"version": v})  # never blocks, whatever the subscriber does
        hub.close("closed", {"reason": "closed"})
        events = await _drain(slow)
        assert [e.name for e in events] == ["lagged", "appended", "appended", "closed"]
        assert events[0].data == {"missed": 8} and events[0].id is None
        assert [e.data.get("version") for e in events[1:3]] == [8, 9]
        assert hub.subscribers == set()

    asyncio.run(run())


def test_resume_replays_after_the_last_event_id_and_reports_what_fell_out_of_the_window():
    async def run():
        hub = SessionEvents(replay=4, buffer=16, max_subscribers=4)
        ids = [hub.publish("appended", {"version": v}).id for v in range(6)]
        resumed = hub.subscribe(last_event_id=ids[3])
        hub.close("expired", {"reason": "expired"})
        assert [e.data.get("version") for e in await _drain(resumed)] == [4, 5, None]
        hub2 = SessionEvents(replay=2, buffer=16, max_subscribers=4)
        ids = [hub2.publish("appended", {"version": v}).id for v in range(5)]
        late = hub2.subscribe(last_event_id=ids[0])
        hub2.close("closed", {})
        events = await _drain(late)
        assert events[0].name == "lagged" and events[0].data == {"missed": 2}
        assert [e.data.get("version") for e in events[1:]] == [3, 4, None]
        assert hub2.subscribe().ended  # a closed hub ends new streams at once

    asyncio.run(run())


def test_event_ids_are_unique_and_consecutive_per_stream_and_count_losses_exactly():
    async def run():
        a, b = SessionEvents(2, 8, 1), SessionEvents(2, 8, 1)
        ids_a = [a.publish("x", {"n": i}).id for i in range(3)]
        ids_b = [b.publish("x", {"n": i}).id for i in range(3)]
        assert ids_a == list(range(ids_a[0], ids_a[0] + 3)) and not set(ids_a) & set(ids_b)
        assert a.publish("x", {}).sse()["id"] == str(ids_a[-1] + 1)
        # other streams' events never count as lost: only this stream's evicted ones do
        late = a.subscribe(last_event_id=ids_a[0])
        a.close("closed", {})
        events = await _drain(late)
        assert events[0].data == {"missed": 1} and [e.data.get("n") for e in events[1:]] == [2, None, None]
        # an id of another stream (e.g. an earlier incarnation) resumes from the start of this one
        other = b.subscribe(last_event_id=ids_a[1])
        b.close("closed", {})
        events = await _drain(other)
        assert events[0].data == {"missed": 1} and [e.data.get("n") for e in events[1:3]] == [1, 2]
        # a subscriber that comes after the end gets the final event
        assert [e.name for e in await _drain(a.subscribe())] == ["closed"]

    asyncio.run(run())


def test_flash_answers_only_move_forward_and_wake_waiters():
    async def run():
        q = FlashQuery(None, {}, 8, None, lambda s: None, lambda n: None)
        waiter = asyncio.create_task(q.wait_for_version(3, 5, lambda: True))
        await asyncio.sleep(0)
        q.record(FlashAnswer(2, 20, 100, "old", (1,), (9,), "length", 0.5))
        await asyncio.sleep(0)
        assert not waiter.done() and q.due(21) and not q.due(20)
        q.record(FlashAnswer(3, 30, 100, "new", (2,), (9,), "length", 0.5))
        await asyncio.wait_for(waiter, 1)
        q.record(FlashAnswer(3, 25, 100, "older", (3,), (9,), "length", 0.5))  # a late evaluation of an older state
        assert q.answer.text == "new"
        public = q.to_public(session_version=4)
        assert public["version"] == 3 and public["stale"] is True and "answer_token_ids" not in public
        q.fail("context full", 40)
        assert not q.due(40) and q.due(41) and q.to_public(4)["error"] == "context full"
        # bounded: it returns with what it has (a wait that ignored its bound would trip the 30 s guard)
        await asyncio.wait_for(q.wait_for_version(9, 0.05, lambda: True), 30)
        assert q.answer.version == 3

    asyncio.run(run())


def test_confidence_is_the_geometric_mean_token_probability():
    assert confidence_of(math.log(0.25) * 2, 2) == 0.25
    assert confidence_of(0.0, 3) == 1.0
    assert confidence_of(None, 3) is None and confidence_of(-1.0, 0) is None


def test_only_greedy_params_have_a_cache_signature():
    greedy = SimpleNamespace(temperature=0.0, max_tokens=8, stop=["x"])
    assert sampling_signature(greedy) == sampling_signature(SimpleNamespace(**vars(greedy)))
    assert sampling_signature(SimpleNamespace(**{**vars(greedy), "max_tokens": 9})) != sampling_signature(greedy)
    assert sampling_signature(SimpleNamespace(temperature=0.7, max_tokens=8)) is None
    # the plugin's own tags do not matter, a client's vllm_xargs do
    tagged = SimpleNamespace(**vars(greedy), extra_args={"stateful_session": "k", "stateful_class": "flash"})
    assert sampling_signature(tagged) == sampling_signature(greedy)
    assert sampling_signature(SimpleNamespace(**vars(greedy), extra_args={"x": 1})) != sampling_signature(greedy)


def test_a_rewind_keeps_only_answers_that_read_exactly_the_versions_content():
    """A label is a lower bound (a turn committed above a queued append is in the tokens read):
    rewound to version 2 (its first 100 tokens), an answer labelled 2 over 130 tokens is dropped."""

    async def run():
        def rewound(answer: FlashAnswer) -> FlashAnswer | None:
            q = FlashQuery(None, {}, 8, None, lambda s: None, lambda n: None)
            q.record(answer)
            q.forget_after(2, 100, commit_seq=50)
            return q.answer

        assert rewound(FlashAnswer(2, 40, 130, "read the turn too", (1,), (9,), "length", 0.5)) is None
        exact = FlashAnswer(2, 40, 100, "read version 2", (1,), (9,), "length", 0.5)
        assert rewound(exact) is exact
        older = FlashAnswer(1, 30, 90, "read version 1", (1,), (9,), "length", 0.5)
        assert rewound(older) is older  # kept, and shown stale at version 2
        assert rewound(FlashAnswer(3, 45, 110, "read version 3", (1,), (9,), "length", 0.5)) is None

    asyncio.run(run())
