"""The multi-tenant scheduler on the real engine: shared prefixes computed and charged once,
queries ahead of ingestion, ingestion's minimum share (engine/work_classes.py)."""

import concurrent.futures
import random
import time

import httpx
import pytest

from tests.e2e.conftest import BLOCK_SIZE, CHUNK_TOKENS, INGEST_SHARE, INGEST_YIELD, wait_until

pytestmark = pytest.mark.e2e

N_SESSIONS = 20
SYSTEM_TOKENS = 1000


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _prefill_computed(server) -> float:
    return server.metric("vllm:request_prefill_kv_computed_tokens_sum")


def test_sessions_sharing_a_system_prompt_prefill_it_once_and_are_charged_once(stateful_server, reference):
    server = stateful_server
    rng = random.Random(7)
    system = [rng.randrange(10, 3000) for _ in range(SYSTEM_TOKENS)]
    prompts = {f"shared-{n}": system + [rng.randrange(10, 3000) for _ in range(8)] for n in range(N_SESSIONS)}
    before = server.idle()
    computed_before = _prefill_computed(server)
    free_budget = before["budget_blocks"] - before["charged_blocks"]
    copies = N_SESSIONS * _cdiv(SYSTEM_TOKENS + 8, BLOCK_SIZE)
    shared_full = SYSTEM_TOKENS // BLOCK_SIZE  # 31 full blocks of the system prompt
    physical = shared_full + N_SESSIONS  # + one private tail block per session
    assert physical <= free_budget < copies, "the budget must hold the physical cells but not 20 copies"

    def create(sid: str) -> httpx.Response:
        return server.post("/v1/sessions", json={"id": sid, "prompt": prompts[sid]})

    with concurrent.futures.ThreadPoolExecutor(N_SESSIONS) as pool:
        with server.paused():  # all 20 admitted and reserved at once, before any of them computes
            futures = [pool.submit(create, sid) for sid in prompts]
            wait_until(
                lambda: any(f.done() for f in futures) or server.integrity()["waiting"] == N_SESSIONS,
                what="20 sessions queued in the engine",
            )
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [201] * N_SESSIONS, [r.text for r in responses if r.status_code != 201]

    after = server.idle()
    # the engine's own counter: the shared prefix was computed once, not per session
    computed = _prefill_computed(server) - computed_before
    tails = (N_SESSIONS - 1) * (SYSTEM_TOKENS + 8 - shared_full * BLOCK_SIZE)
    assert computed <= SYSTEM_TOKENS + 8 + tails, computed
    assert after["counters"]["shared_prefix_tokens"] - before["counters"].get("shared_prefix_tokens", 0) >= (
        (N_SESSIONS - 1) * shared_full * BLOCK_SIZE
    )
    # charged by physical cells, and the engine pins exactly those
    assert after["pinned_blocks"] - before["pinned_blocks"] == physical
    assert after["charged_blocks"] - before["charged_blocks"] == physical
    for sid in prompts:
        s = server.session(sid)
        assert (s["pinned_blocks"], s["shared_blocks"]) == (shared_full + 1, shared_full), s

    # sharing blocks changes no answer: a follow-up equals a stock engine without prefix caching
    sid = "shared-3"
    r = server.complete(sid, [11, 12, 13], max_tokens=4)
    body = r.json()
    assert body["session"]["recomputed_tokens"] == 0, body["session"]
    tokens = body["choices"][0]["token_ids"]
    assert tokens == reference.greedy(prompts[sid] + [11, 12, 13], 4)

    # closing in any order: the shared blocks' charge moves to the survivors, exactly
    order = list(prompts)
    random.Random(3).shuffle(order)
    baseline_charged, baseline_pinned = before["charged_blocks"], before["pinned_blocks"]
    for n, sid in enumerate(order):
        assert server.delete(f"/v1/sessions/{sid}").status_code == 200
        now = server.idle()  # the integrity check: ledger, pins and block pool agree
        extra_charged = now["charged_blocks"] - baseline_charged
        extra_pinned = now["pinned_blocks"] - baseline_pinned
        assert extra_charged == extra_pinned, (n, now)
        left = N_SESSIONS - n - 1
        assert extra_pinned >= (shared_full + left if left else 0)
    assert (now["charged_blocks"], now["pinned_blocks"]) == (baseline_charged, baseline_pinned)
    assert now["free_blocks"] == before["free_blocks"]  # nothing leaked in the block pool


def _ingesting(server) -> int:
    info = server.get("/v1/stateful/debug/integrity").json()
    return info["counters"].get("tokens_ingest", 0)


def test_a_query_arriving_during_a_long_ingestion_waits_at_most_one_chunk(stateful_server):
    server = stateful_server
    server.fresh_session("sched-q", 64, seed=1)
    rng = random.Random(5)
    for attempt in range(5):
        before = server.idle()["counters"]
        start_tokens = _ingesting(server)
        prompt = [rng.randrange(10, 3000) for _ in range(1400)]  # several chunks of CHUNK_TOKENS
        pool = concurrent.futures.ThreadPoolExecutor(2)
        created = pool.submit(server.post, "/v1/sessions", json={"id": f"sched-long-{attempt}", "prompt": prompt})
        while _ingesting(server) == start_tokens and not created.done():  # a few steps only
            time.sleep(0.01)
        if created.done():
            assert created.result().status_code == 201, created.result().text
        with server.paused():  # frozen mid-ingestion: the query arrives while it still runs
            depth = server.get("/v1/stateful/debug/integrity").json()
            if depth["running"] == 0:
                pool.shutdown(wait=True)
                continue  # the ingestion finished before the pause landed (this process was stopped): again
            query = pool.submit(server.complete, "sched-q", [21, 22], 2, False)
            wait_until(lambda: server.get("/v1/stateful/debug/integrity").json()["waiting"] > 0, what="query queued")
        assert query.result().status_code == 200 and created.result().status_code == 201
        pool.shutdown(wait=True)
        waits = [w for w in server.idle()["waits"] if w["class"] == "query"]
        wait = waits[-1]
        assert wait["ingest_running_at_arrival"], wait
        # admitted in the first step after it arrived: no ingestion chunk ran ahead of it
        assert wait["steps"] == 0 and wait["ingest_tokens_while_waiting"] == 0, wait
        # and its decode step carried no ingestion: the ingestion yielded to it (INGEST_YIELD >= 2 steps)
        after = server.idle()["counters"]
        assert after.get("ingest_yield_steps", 0) > before.get("ingest_yield_steps", 0)
        assert after.get("ingest_share_steps", 0) == before.get("ingest_share_steps", 0)
        return
    raise AssertionError("the ingestion never overlapped the query (5 attempts)")


def test_ingestion_under_continuous_queries_still_advances_at_its_share(stateful_server):
    server = stateful_server
    server.fresh_session("sched-busy", 64, seed=2)
    before = server.idle()["counters"]
    # three long queries, running in the engine for the whole ingestion whatever the test process's
    # own scheduling (this VM can stop a process for seconds; the engine keeps decoding meanwhile)
    query = {"model": "tiny", "prompt": [31, 32, 33], "max_tokens": 600, "ignore_eos": True, "temperature": 0,
             "stateful": "sched-busy", "stateful_commit": False}  # fmt: skip
    prompt = [random.Random(9).randrange(10, 3000) for _ in range(1200)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # all four requests reach the engine while it is paused, so they start in the same step,
        # however the machine schedules this process (a poll for "3 running" once missed queries
        # that had started and finished while this process was stopped: a CI run of stop 25)
        with server.paused():
            queries = [pool.submit(server.post, "/v1/completions", json=query) for _ in range(3)]
            wait_until(lambda: server.integrity()["waiting"] >= 3, timeout_s=120, what="queries queued")
            created = pool.submit(server.post, "/v1/sessions", json={"id": "sched-ingest", "prompt": prompt})
            wait_until(lambda: server.integrity()["waiting"] >= 4, timeout_s=120, what="ingestion queued")
        r = created.result()
        answered = [q.result().status_code for q in queries]
    assert r.status_code == 201, r.text
    assert answered == [200] * 3
    after = server.idle()["counters"]

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    # it advanced beside the queries (all of it: the queries decode 600 steps, it needs about 40),
    # in steps carrying its share (<= INGEST_SHARE tokens) ...
    assert delta("ingest_share_steps") > 0
    assert delta("tokens_ingest") >= 1200 - BLOCK_SIZE
    assert delta("tokens_ingest") <= delta("tokens_ingest_beside_foreground")
    assert delta("tokens_ingest_beside_foreground") <= INGEST_SHARE * delta("ingest_share_steps")
    # ... in every step once the queries had run INGEST_YIELD steps: sustained foreground keeps
    # ingestion's share per step (it yields only early in a burst, and is never held for more than
    # max_ingest_hold_steps = 1 steps in a row after that)
    assert delta("ingest_yield_steps") <= INGEST_YIELD
    assert delta("ingest_held_steps") <= delta("ingest_share_steps") + 1 + INGEST_YIELD
    assert INGEST_SHARE < CHUNK_TOKENS


def test_ingestion_a_query_waits_for_runs_in_the_query_class(stateful_server):
    server = stateful_server
    sid = "sched-inherit"
    server.fresh_session(sid, 64, seed=4)
    before = server.idle()["counters"]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    turn = {"model": "tiny", "prompt": [50], "max_tokens": 8, "ignore_eos": True, "stateful": sid}
    with server.held_request("/v1/completions", turn) as held:  # the turn holds the session
        r = server.post(f"/v1/sessions/{sid}/append", json={"token_ids": list(range(100, 400))})
        assert r.status_code == 202, r.text  # queued behind the turn: not in the engine yet
        # read-your-writes: this query waits for the append
        query = pool.submit(server.complete, sid, [41, 42], 2, False)
        wait_until(lambda: server.integrity()["ingest_waiters"].get(sid), what="query waiting for the append")
    assert held.result().status_code == 200
    body = query.result().json()
    pool.shutdown(wait=True)
    assert body["session"]["context_tokens"] >= 64 + 300 and body["session"]["recomputed_tokens"] == 0
    after = server.idle()["counters"]
    # the append's prefill ran in the query class (the query waited for it), not as background ingestion
    assert after.get("tokens_ingest", 0) == before.get("tokens_ingest", 0)
    assert after["tokens_query"] - before["tokens_query"] >= 300
