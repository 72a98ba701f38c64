"""The session service under faults, with a fake engine bridge (no engine).

Imports vLLM's SamplingParams (the service builds them), so this module
takes a few seconds to import; nothing here starts an engine.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from vllm_stateful.config import StatefulConfig
from vllm_stateful.sessions.chat_render import continuation, reply_closing
from vllm_stateful.sessions.store import SessionError
from vllm_stateful.sessions.tenants import Tenancy

pytestmark = pytest.mark.unit

TEMPLATE_ROLES_REFUSED = {"bomb"}


class FakeBridge:
    """Character tokenizer (token = ord), ChatML-like template, an engine that echoes.

    Records the thread every tokenizer/template call runs on."""

    max_model_len = 4096
    max_token_chars = 1

    def min_tokens_of(self, chars: int) -> int:
        return chars

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.fail_ops: set[str] = set()
        self.calls: list[tuple[str, dict]] = []
        self.pins: dict[str, int] = {}
        self.abort_next = 0  # the engine aborts this many of the next requests
        self._closing = None
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1)

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def parse_json(self, body):
        import json

        return json.loads(body)

    def _record(self) -> None:
        self.threads.append(threading.get_ident())

    def render(self, messages, add_generation_prompt: bool) -> str:
        self._record()
        if any(m["role"] in TEMPLATE_ROLES_REFUSED for m in messages):
            raise SessionError(400, "the chat template refused the messages", "template_error")
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def continuation(self, previous, new, add_generation_prompt):
        return continuation(self.render, previous, new, add_generation_prompt)

    @property
    def closing(self):
        if self._closing is None:
            self._closing = reply_closing(self.render)
        return self._closing

    def encode(self, text: str, first: bool) -> list[int]:
        self._record()
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self._record()
        return "".join(chr(i) for i in ids)

    dp_size = 1

    async def call_all(self, op: str, **args):
        return [await self.call(op, **args)]

    async def call(self, op: str, rank: int = 0, **args):
        self.calls.append((op, args))
        if op in self.fail_ops:
            raise RuntimeError(f"engine refused {op}")
        if op == "handshake":
            return {"num_blocks": 1000, "block_size": 16, "kv_epoch": 0}
        if op == "sync":
            self.pins[args["key"]] = args["keep_tokens"]
            return {"pinned_tokens": args["keep_tokens"], "pinned_blocks": -(-args["keep_tokens"] // 16)}
        if op == "release":
            return {"freed_blocks": -(-self.pins.pop(args["key"], 0) // 16)}
        return {}

    async def generate(self, prompt, params, request_id, cache_salt, priority=0, session_id=None, rank=0):
        await asyncio.sleep(0)
        n = params.max_tokens
        reason = "length"
        if self.abort_next:
            self.abort_next -= 1
            reason, n = "abort", 0
        out = SimpleNamespace(token_ids=[ord("a")] * n, text="a" * n, finish_reason=reason, stop_reason=None)
        yield SimpleNamespace(outputs=[out], num_cached_tokens=0, finished=True)

    async def abort(self, request_id: str) -> None:
        pass


def _service(**config):
    from vllm_stateful.server.metrics import SessionMetrics
    from vllm_stateful.server.service import SessionService

    bridge = FakeBridge()
    service = SessionService(bridge, StatefulConfig(**config), SessionMetrics(), Tenancy.from_settings(None, None))
    return service, bridge


def _params(n: int):
    from vllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0)


async def _tokens(_session):
    from vllm_stateful.server.turn_types import TurnInput

    return TurnInput([ord("q"), ord("r")])


async def _run(service, session, created=False, commit=True, max_tokens=3, build=_tokens):
    return [r async for r, _ in service.run_turn(session, created, build, _params, max_tokens, commit, False)]


def test_a_failed_engine_sync_commits_nothing():
    async def run():
        service, bridge = _service()
        await service.start()
        session, created = service.open_session("t", "s1", commit=True)
        await _run(service, session, created)
        before = (list(session.token_ids), session.version, service.ledger.charged_blocks())
        bridge.fail_ops.add("sync")
        with pytest.raises(SessionError) as e:
            await _run(service, session)
        assert e.value.status == 503 and e.value.code == "engine_unavailable"
        assert (session.token_ids, session.version, service.ledger.charged_blocks()) == before
        assert not session.turn_in_flight and not session.write_lock.locked()
        assert service.ledger.check_integrity() == []
        bridge.fail_ops.clear()
        await _run(service, session)  # and the session is usable afterwards
        assert session.version == before[1] + 1

    asyncio.run(run())


def test_a_refused_first_request_leaves_no_session_and_no_reservation():
    async def run():
        service, _ = _service(session_quota=64)
        await service.start()
        session, created = service.open_session("t", "fresh", commit=True)
        with pytest.raises(SessionError) as e:
            await _run(service, session, created, max_tokens=100)
        assert e.value.code == "session_quota_exceeded"
        assert not service.store.contains("t", "fresh") and service.ledger.charged_blocks() == 0

    asyncio.run(run())


def test_tokenizer_and_template_never_run_on_the_event_loop():
    async def run():
        from vllm_stateful.server.ingest import Ingestor

        service, bridge = _service()
        await service.start()
        loop_thread = threading.get_ident()
        session, created = service.open_session("t", "s1", commit=True)

        async def chat(s):
            return await service.chat_input(s, [{"role": "user", "content": "hello"}], True)

        await _run(service, session, created, build=chat)
        ingestor = Ingestor(service)
        item = await ingestor.append(session, "some text", None, None)
        await ingestor.append(session, None, None, [{"role": "user", "content": "more"}])
        await service.wait_ingested(session, item.seq + 1)
        await service.text_input(session, "x")
        assert bridge.threads and loop_thread not in bridge.threads

    asyncio.run(run())


def test_ingestion_failure_fails_the_session_and_releases_waiters():
    async def run():
        from vllm_stateful.server.ingest import Ingestor

        service, bridge = _service()
        await service.start()
        session, _ = service.open_session("t", "s1", commit=True)
        ingestor = Ingestor(service)
        await session.write_lock.acquire()  # a turn is running: appends queue up
        await ingestor.append(session, None, [1, 2], None)
        # acknowledged, then refused by the template only once it is ingested
        TEMPLATE_ROLES_REFUSED.add("later")
        try:
            second = await ingestor.append(session, None, None, [{"role": "user", "content": "x"}])
            session.pending_appends[-1].messages = [{"role": "later", "content": "x"}]
            waiter = asyncio.ensure_future(service.wait_ingested(session, second.seq))
            session.write_lock.release()
            with pytest.raises(SessionError) as e:
                await asyncio.wait_for(waiter, 10)
            assert e.value.code == "session_failed" and session.state == "failed"
            await asyncio.wait_for(session.ingest_task, 10)  # the drain ended cleanly
            assert session.queued_tokens == 0 and service.ledger.check_integrity() == []
            assert service.ledger.charged_blocks() == 0  # the failed batch's reservations were returned
        finally:
            TEMPLATE_ROLES_REFUSED.discard("later")

    asyncio.run(run())


def test_waiting_for_a_backlog_is_bounded():
    async def run():
        from vllm_stateful.server.ingest import Ingestor

        service, _ = _service(ingest_wait_timeout_s=0.2)
        await service.start()
        session, _ = service.open_session("t", "s1", commit=True)
        await session.write_lock.acquire()  # ingestion cannot progress
        await Ingestor(service).append(session, None, [1, 2], None)
        with pytest.raises(SessionError) as e:
            await _run(service, session)
        assert e.value.status == 503 and e.value.code == "session_backlog" and e.value.retry_after
        assert session.version == 1 and not session.turn_in_flight
        session.write_lock.release()

    asyncio.run(run())


def test_maintenance_survives_errors_and_counts_them():
    async def run():
        from vllm_stateful.server.lifecycle import Maintenance

        service, bridge = _service()
        await service.start()
        session = service.store.create("t", "short", ttl_s=1)
        session.last_used_at -= 10
        maintenance = Maintenance(service, interval_s=0.01)
        bridge.fail_ops.add("info")
        original = service.store.expired
        service.store.expired = lambda now=None: (_ for _ in ()).throw(RuntimeError("boom"))
        before = service.metrics.background_errors.labels(task="expiry")._value.get()
        await maintenance.run_once()
        assert service.metrics.background_errors.labels(task="expiry")._value.get() == before + 1
        service.store.expired = original
        bridge.fail_ops.clear()
        await service.close(session, reason="closed")  # a DELETE got there first ...
        session2 = service.store.create("t", "short2", ttl_s=1)
        session2.last_used_at -= 10
        task = asyncio.ensure_future(maintenance.run())
        await asyncio.sleep(0.2)
        task.cancel()
        assert not service.store.contains("t", "short2")  # ... and expiry kept running

    asyncio.run(run())


def test_maintenance_ends_quietly_once_the_engine_is_gone():
    """After Ctrl-C (or a dead engine) vLLM's client raises EngineDeadError on every call: the loop
    stops instead of logging a failure a second until the process exits."""

    async def run():
        from vllm.v1.engine.exceptions import EngineDeadError

        from vllm_stateful.server.lifecycle import Maintenance

        service, bridge = _service()
        await service.start()
        maintenance = Maintenance(service, interval_s=0.01)
        assert await maintenance.run_once() is True

        async def dead(*args, **kwargs):
            raise EngineDeadError()

        bridge.call_all = dead
        before = service.metrics.background_errors.labels(task="kv_drops")._value.get()
        await asyncio.wait_for(maintenance.run(), timeout=5)  # returns: the loop ended
        assert service.metrics.background_errors.labels(task="kv_drops")._value.get() == before

    asyncio.run(run())


def test_ingestion_the_engine_aborts_is_retried_not_failed():
    async def run():
        from vllm_stateful.server import ingest
        from vllm_stateful.server.ingest import Ingestor

        ingest.RETRY_FIRST_S = 0.01
        service, bridge = _service()
        await service.start()
        session, _ = service.open_session("t", "s1", commit=True)
        bridge.abort_next = 2  # e.g. vLLM paused with mode=abort, twice
        item = await Ingestor(service).append(session, None, [1, 2, 3], None)
        await asyncio.wait_for(service.wait_ingested(session, item.seq), 10)
        assert session.state == "resident" and session.token_ids == [1, 2, 3] and session.queued_tokens == 0
        assert service.ledger.held_tokens(session.key) == 3 and service.ledger.check_integrity() == []

    asyncio.run(run())


def test_a_query_reads_one_snapshot_and_reports_the_version_it_read():
    async def run():
        service, _ = _service()
        await service.start()
        session, created = service.open_session("t", "s1", commit=True)
        await _run(service, session, created)  # version 1: "qr" + "aaa"
        before = list(session.token_ids)

        async def build_then_commit_elsewhere(s):
            turn_input = await service.text_input(s, "zz")  # snapshot taken here
            s.token_ids = s.token_ids + [1, 2]  # a commit lands while the query is being built
            s.version += 1
            return turn_input

        results = await _run(service, session, commit=False, build=build_then_commit_elsewhere)
        final = results[-1]
        assert final.prompt_tokens == len(before) + 2  # history snapshot + "zz", not the newer history
        assert final.session_field()["version"] == 1

    asyncio.run(run())


class ReferencingBridge(FakeBridge):
    """An engine that reports sync generations (so requests reference the pinned prefix), records
    what each request sent, refuses the next ``refuse_refs`` references as the engine does
    (finished with ``error`` and its marker, before any token), and fails the next ``fail_next``
    requests with a plain ``error``."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[list[int], dict]] = []
        self.generations: dict[str, int] = {}
        self.refuse_refs = 0
        self.fail_next = 0

    def primes_alone(self, tail, skip_special_tokens: bool) -> bool:
        return True

    async def call(self, op: str, rank: int = 0, **args):
        info = await super().call(op, rank, **args)
        if op == "sync":
            self.generations[args["key"]] = self.generations.get(args["key"], 0) + 1
            info["generation"] = self.generations[args["key"]]
        return info

    async def generate(self, prompt, params, request_id, cache_salt, priority=0, session_id=None, rank=0):
        self.sent.append((list(prompt), dict(params.extra_args or {})))
        from vllm_stateful.engine.request_tags import UNRESOLVED_STOP_REASON

        if self.refuse_refs and "stateful_ref" in (params.extra_args or {}):
            self.refuse_refs -= 1
            out = SimpleNamespace(token_ids=[], text="", finish_reason="error", stop_reason=UNRESOLVED_STOP_REASON)
            yield SimpleNamespace(outputs=[out], num_cached_tokens=0, finished=True)
            return
        if self.fail_next:
            self.fail_next -= 1
            out = SimpleNamespace(token_ids=[], text="", finish_reason="error", stop_reason=None)
            yield SimpleNamespace(outputs=[out], num_cached_tokens=0, finished=True)
            return
        async for out in super().generate(prompt, params, request_id, cache_salt, priority, session_id, rank):
            yield out


def test_requests_reference_the_pinned_history_and_are_resent_whole_when_refused():
    async def run():
        from vllm_stateful.server.metrics import SessionMetrics
        from vllm_stateful.server.service import SessionService
        from vllm_stateful.server.session_kv import MIN_REFERENCED_TOKENS
        from vllm_stateful.server.turn_types import TurnInput

        bridge = ReferencingBridge()
        service = SessionService(bridge, StatefulConfig(), SessionMetrics(), Tenancy.from_settings(None, None))
        await service.start()
        session, created = service.open_session("t", "long", commit=True)
        history = [ord("a") + i % 20 for i in range(MIN_REFERENCED_TOKENS + 100)]

        async def first(_s):
            return TurnInput(list(history))

        await _run(service, session, created, build=first)
        assert "stateful_ref" not in bridge.sent[-1][1]  # nothing pinned yet: sent whole
        whole = list(session.token_ids)
        pinned, generation = session.pinned_tokens, session.pin_generation
        assert generation == 1 and pinned == len(whole)

        await _run(service, session, commit=False, max_tokens=2)  # a read-only query
        prompt, args = bridge.sent[-1]
        ref = args["stateful_ref"]
        assert ref == [generation, len(whole) + 2 - 32]  # all but the detokenizer's last 32 tokens are referenced
        assert prompt == (whole + [ord("q"), ord("r")])[ref[1] :]

        bridge.refuse_refs = 1
        results = await _run(service, session, max_tokens=3)  # a committing turn, refused once
        assert [("stateful_ref" in a, len(p)) for p, a in bridge.sent[-2:]] == [(True, 32), (False, len(whole) + 2)]
        assert results[-1].finish_reason == "length" and session.token_ids == whole + [ord("q"), ord("r")] + [97] * 3
        assert service.kv.unresolved_references == 1 and session.pin_generation == 2
        assert service.ledger.check_integrity() == []

        # an engine error that is not a refused reference is not resent: the turn fails, nothing commits
        bridge.fail_next, sent_before, before = 1, len(bridge.sent), list(session.token_ids)
        with pytest.raises(SessionError) as e:
            await _run(service, session, max_tokens=3)
        assert e.value.status == 503 and len(bridge.sent) == sent_before + 1 and session.token_ids == before
        assert service.kv.unresolved_references == 1

    asyncio.run(run())
