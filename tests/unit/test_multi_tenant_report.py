"""Unit tests for the multi-tenant benchmark: its pure helpers (Poisson plan, Prometheus text parsing,
scheduler overhead, summaries, CSV/Markdown/PNG) and its clients against in-memory fake servers
(``httpx.MockTransport``): a block-granular LRU prefix cache for stock vLLM (re-prefilled tokens,
the capacity probe) and a session server with ``/metrics``. No engine, no timing assertions."""

from __future__ import annotations

import asyncio
import csv
import json
import random
from collections import OrderedDict

import httpx
import multi_tenant as mtb
import multi_tenant_report as mt
import pytest
from harness.results import columns_of, write_rows

pytestmark = pytest.mark.unit

METRICS = """# HELP vllm_stateful:scheduler_seconds_total Seconds in schedule()
# TYPE vllm_stateful:scheduler_seconds_total counter
vllm_stateful:scheduler_seconds_total {sched}
vllm_stateful:step_seconds_total {step}
vllm_stateful:fragmentation 0.25
vllm_stateful:pinned_blocks 40.0
vllm_stateful:budget_blocks 100
vllm_stateful:class_wait_seconds_sum{{class="query"}} {qwait}
vllm_stateful:class_wait_count{{class="query"}} {qcount}
vllm_stateful:class_wait_seconds_sum{{class="ingest"}} 9.0
vllm_stateful:class_wait_count{{class="ingest"}} 3.0
vllm:num_requests_running{{model_name="m",engine="0"}} 2.0 1700000000000
"""


def metrics_text(sched=1.0, step=10.0, qwait=0.5, qcount=5):
    return METRICS.format(sched=sched, step=step, qwait=qwait, qcount=qcount)


# ---------------------------------------------------------------- Prometheus


def test_parse_prometheus_reads_names_labels_values_and_skips_the_rest():
    text = (
        "# TYPE x counter\n\nx_total 3\n"
        'y{a="1",b="two words"} 2.5\n'
        'y{b="q\\"uote",a="1"} 1\n'
        "z +Inf\nnan_metric NaN\n"
        "garbage line without value\n"
        "w 7 1700000000000\n"
    )
    s = mt.parse_prometheus(text)
    assert s[("x_total", ())] == 3.0
    assert s[("y", (("a", "1"), ("b", "two words")))] == 2.5
    assert s[("y", (("a", "1"), ("b", 'q\\"uote')))] == 1.0
    assert s[("z", ())] == float("inf") and s[("w", ())] == 7.0
    assert ("garbage", ()) not in s and len(s) == 6


def test_metric_adds_prefix_tries_total_and_sums_matching_series():
    s = mt.parse_prometheus(metrics_text())
    assert mt.metric(s, "scheduler_seconds") == 1.0  # a counter is exported as ..._total
    assert mt.metric(s, "step_seconds_total") == 10.0  # the full name works too
    assert mt.metric(s, "fragmentation") == 0.25
    assert mt.metric(s, "class_wait_count", **{"class": "query"}) == 5.0
    assert mt.metric(s, "class_wait_count") == 8.0  # all classes
    assert mt.metric(s, "vllm:num_requests_running", engine="0") == 2.0
    assert mt.metric(s, "missing", "budget_blocks") == 100.0  # first present name wins
    assert mt.metric(s, "missing") is None and mt.metric(None, "fragmentation") is None
    assert mt.metric(s, "class_wait_count", **{"class": "flash"}) is None


def test_scheduler_overhead_and_class_wait_are_deltas_over_the_phase():
    before = mt.parse_prometheus(metrics_text(sched=1.0, step=10.0, qwait=0.5, qcount=5))
    after = mt.parse_prometheus(metrics_text(sched=1.5, step=14.0, qwait=2.5, qcount=9))
    assert mt.scheduler_overhead(before, after) == pytest.approx(0.5 / 4.0)
    assert mt.class_wait_mean(before, after, "query") == pytest.approx(2.0 / 4)
    assert mt.class_wait_mean(before, after, "ingest") is None  # no new ingest waits: 0/0
    assert mt.scheduler_overhead(before, before) is None  # no step time passed
    assert mt.scheduler_overhead(None, after) is None


def test_phase_metrics_tolerates_a_server_without_the_metrics():
    stock = mt.parse_prometheus('vllm:num_requests_running{model_name="m"} 0\n')
    pm = mt.phase_metrics(stock, stock, retries=2, failed_queries=1)
    assert pm.scheduler_overhead is None and pm.fragmentation is None and pm.grouped_prefill_saved is None
    assert set(pm.class_wait_s) == {"query", "plain", "ingest", "flash"}
    assert all(v is None for v in pm.class_wait_s.values())
    assert (pm.retries, pm.failed_queries) == (2, 1)
    ours = mt.phase_metrics(mt.parse_prometheus(metrics_text()), mt.parse_prometheus(metrics_text(step=12.0)))
    assert (ours.fragmentation, ours.pinned_blocks, ours.budget_blocks) == (0.25, 40.0, 100.0)
    assert ours.scheduler_overhead == 0.0


# ---------------------------------------------------------------- workload


def test_plan_is_deterministic_sorted_and_in_vocab():
    args = (4, 100.0, 0.2, 0.1, 8, 3, list(range(5)), (300, 400), 7)
    a, b = mt.make_plan(*args), mt.make_plan(*args)
    assert a == b and a != mt.make_plan(*args[:-1], 8)
    assert a.system == (0, 1, 2, 3, 4) and len(a.sessions) == 4
    for events in a.sessions:
        assert [e.t_s for e in events] == sorted(e.t_s for e in events)
        assert all(0 <= e.t_s < 100.0 for e in events)
        for e in events:
            assert len(e.token_ids) == (8 if e.kind == "append" else 3)
            assert all(300 <= t < 400 for t in e.token_ids)
    appends = sum(e.kind == "append" for s in a.sessions for e in s)
    queries = sum(e.kind == "query" for s in a.sessions for e in s)
    assert 50 <= appends <= 110 and 20 <= queries <= 60  # 80 and 40 expected


def test_poisson_times_rate_and_bounds():
    times = mt.poisson_times(5.0, 1000.0, random.Random(1))
    assert times == sorted(times) and all(0 < t < 1000 for t in times)
    assert 4700 < len(times) < 5300
    assert mt.poisson_times(0.0, 10.0, random.Random(1)) == []


def test_full_hit_and_stock_recomputed():
    assert mt.full_hit_tokens(768, 32) == 736  # the last token is always computed
    assert mt.full_hit_tokens(770, 32) == 768 and mt.full_hit_tokens(1, 32) == 0
    assert mt.stock_recomputed(100, 64, 20) == 16
    assert mt.stock_recomputed(100, 96, 20) == 0  # never negative
    assert mt.stock_recomputed(100, None, 20) is None


# ---------------------------------------------------------------- summaries and files


def _rows():
    q = mt.QueryRow
    return [
        q(mt.OURS, 4, 0, 0.1, 600, 0.10, 16, 0),
        q(mt.OURS, 4, 1, 0.2, 700, 0.30, 16, 0),
        q(mt.OURS, 4, 2, 0.3, 800, 0.20, 16, 0),
        q(mt.STOCK, 4, 0, 0.1, 600, 0.50, 90, 10),
        q(mt.STOCK, 4, 1, 0.2, 650, 1.50, 120, 31),
        q(mt.STOCK, 8, 0, 0.1, 640, 0.70, None, None),
    ]


def test_summarize_per_server_and_n():
    phases = {(mt.OURS, 4): mt.PhaseMetrics(0.05, 0.1, class_wait_s={"query": 0.01}, retries=3)}
    s = mt.summarize(_rows(), phases, {mt.OURS: 70, mt.STOCK: 250})
    assert [(x.server, x.n_sessions) for x in s] == [(mt.OURS, 4), (mt.STOCK, 4), (mt.STOCK, 8)]
    ours, stock4, stock8 = s
    assert (ours.queries, ours.ctx_max, ours.p50_s) == (3, 800, pytest.approx(0.2))
    assert ours.p95_s == pytest.approx(0.29)
    assert (ours.prefilled_tokens, ours.reprefilled_tokens, ours.scheduler_overhead) == (48, 0, 0.05)
    assert (ours.query_wait_s, ours.retries, ours.sessions_fit) == (0.01, 3, 70)
    assert (stock4.reprefilled_tokens, stock4.prefilled_tokens, stock4.scheduler_overhead) == (41, 210, None)
    assert stock4.p50_s == pytest.approx(1.0) and stock4.sessions_fit == 250
    assert stock8.reprefilled_tokens is None and stock8.prefilled_tokens == 0
    empty = mt.summarize([], {(mt.OURS, 2): mt.PhaseMetrics()}, {})[0]
    assert (empty.queries, empty.p50_s, empty.ctx_max, empty.sessions_fit) == (0, None, None, None)


def test_csv_markdown_and_png(tmp_path):
    rows = _rows()
    summaries = mt.summarize(rows, {}, {mt.OURS: 70})
    with write_rows(rows, tmp_path / "q.csv", columns_of(mt.QueryRow)).open() as f:
        recs = list(csv.DictReader(f))
    assert list(recs[0])[:6] == ["server", "n_sessions", "session", "t_s", "context_tokens", "latency_s"]
    assert recs[-1]["recomputed_tokens"] == "" and recs[0]["recomputed_tokens"] == "0"
    with write_rows(summaries, tmp_path / "s.csv", columns_of(mt.Summary)).open() as f:
        assert [r["server"] for r in csv.DictReader(f)] == [mt.OURS, mt.STOCK, mt.STOCK]
    table = mt.markdown_table(summaries)
    assert table.count("\n") == 2 + len(summaries)
    assert all(line.count("|") == 15 for line in table.splitlines())
    machine = {"device": "cpu", "cpu_model": "Fake CPU", "cores": 2, "isa_flags": ["avx2", "avx512f"]}
    meta = {"command": "python x", "model": "/m", "dtype": "float32", "machine": machine, "server_args": ["--a"]}
    md = mt.markdown_report(summaries, {mt.OURS: {"sessions_fit": 70}}, meta)
    assert "Fake CPU" in md and "avx512f" in md and "float32" in md and '"sessions_fit": 70' in md
    assert md.startswith("# Multi-tenant benchmark\n") and "machine: cpu, CPU Fake CPU x2; ISA avx2 avx512f" in md
    empty = write_rows([], tmp_path / "e.csv", columns_of(mt.QueryRow)).read_text().splitlines()
    assert empty == [",".join(columns_of(mt.QueryRow))]  # a phase without answers still has the header
    assert mt.plot(rows, summaries, tmp_path / "p.png").stat().st_size > 0


# ---------------------------------------------------------------- clients against fakes


class FakeStock:
    """Stock vLLM's prefix cache, block-granular, LRU-evicted at ``capacity`` blocks; a completion's
    ``cached_tokens`` are its leading cached blocks (never the last token)."""

    def __init__(self, block: int, capacity: int):
        self.block, self.capacity = block, capacity
        self.cache: OrderedDict[tuple, None] = OrderedDict()
        self.prompts: list[list[int]] = []

    async def __call__(self, req: httpx.Request) -> httpx.Response:
        prompt = json.loads(req.content)["prompt"]
        self.prompts.append(prompt)
        keys = [tuple(prompt[: (i + 1) * self.block]) for i in range(len(prompt) // self.block)]
        hit = 0
        for k in keys[: mt.full_hit_tokens(len(prompt), self.block) // self.block]:
            if k not in self.cache:
                break
            hit += 1
        for k in keys:  # computed or reused: most recently used now
            self.cache[k] = None
            self.cache.move_to_end(k)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        usage = {"prompt_tokens": len(prompt), "prompt_tokens_details": {"cached_tokens": hit * self.block}}
        return httpx.Response(200, json={"choices": [{"text": "x"}], "usage": usage})


def _client(cls, handler, block=16):
    srv = cls("http://fake/v1", "m", block, 2)
    srv.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return srv


def test_stock_query_counts_only_the_partial_block_as_re_prefilled():
    async def go():
        srv = _client(mtb.Stock, FakeStock(16, 10_000))
        await srv.create("s", list(range(1000, 1040)))  # 40 tokens: 2 full blocks + 8
        first = await srv.query("s", [1, 2, 3])
        await srv.append("s", list(range(2000, 2010)))
        second = await srv.query("s", [4, 5])
        await srv.append("s", list(range(3000, 3030)))
        third = await srv.query("s", [6])
        return first, second, third

    (_, c1, p1, r1), (_, c2, p2, r2), (_, c3, p3, r3) = asyncio.run(go())
    assert (c1, p1, r1) == (43, 11, 8)  # the 8 tokens past the last full block of the created prompt
    assert (c2, p2, r2) == (52, 20, 8)  # 50 history tokens; 32 cached of the 40 sent before
    assert (c3, p3, r3) == (81, 33, 2)  # 48 of the 50 sent before were cached


def test_stock_probe_finds_the_first_lru_eviction():
    # 64-token system prompt = 4 shared blocks; each probe session adds 2 unique blocks; 24 blocks fit
    # the system prompt and 10 sessions, so the 11th evicts the least recently used one.
    fake = FakeStock(16, 24)
    srv = _client(mtb.Stock, fake)
    found = asyncio.run(mtb.probe(srv, list(range(1000, 1064)), 32, 50, (300, 400)))
    assert found == {"sessions_fit": 10, "first_miss_at": 11, "recomputed_tokens": 32, "cap": 50}
    roomy = asyncio.run(mtb.probe(_client(mtb.Stock, FakeStock(16, 10_000)), list(range(64)), 32, 20, (300, 400)))
    assert roomy["sessions_fit"] is None  # never evicted within the cap


class FakeStateful:
    """Sessions (created with a prompt, first append answered 429), read-only queries (the first answered
    503, as a session still ingesting), /metrics whose
    counters advance by 0.1 s scheduling per 1 s of steps on every scrape; 429 past ``budget`` sessions."""

    def __init__(self, budget: int = 100):
        self.sessions: dict[str, int] = {}
        self.budget, self.scrapes, self.rejected, self.busy, self.deleted = budget, 0, False, False, 0

    async def __call__(self, req: httpx.Request) -> httpx.Response:
        path, body = req.url.path, json.loads(req.content or b"{}")
        if path == "/metrics":
            self.scrapes += 1
            return httpx.Response(200, text=metrics_text(sched=0.1 * self.scrapes, step=1.0 * self.scrapes))
        if path == "/v1/sessions":
            if len(self.sessions) >= self.budget:
                return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"code": 429}})
            self.sessions[body["id"]] = len(body["prompt"])
            return httpx.Response(201, json={"id": body["id"]})
        if path.endswith("/append"):
            if not self.rejected:
                self.rejected = True
                return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"code": 429}})
            self.sessions[path.split("/")[3]] += len(body["token_ids"])
            return httpx.Response(202, json={"queued_tokens": len(body["token_ids"])})
        if req.method == "DELETE":
            self.deleted += 1
            self.sessions.pop(path.split("/")[3])
            return httpx.Response(200, json={"deleted": True})
        assert path == "/v1/completions" and body["stateful_commit"] is False
        if not self.busy:
            self.busy = True
            return httpx.Response(503, headers={"retry-after": "0"}, json={"error": {"code": 503}})
        ctx = self.sessions[body["stateful"]] + len(body["prompt"])
        session = {"context_tokens": ctx, "new_tokens": len(body["prompt"]), "recomputed_tokens": 0}
        return httpx.Response(200, json={"usage": {"prompt_tokens": len(body["prompt"])}, "session": session})


def test_stateful_phase_rows_retries_and_overhead(monkeypatch):
    monkeypatch.setattr(mtb, "SETTLE_S", 0.0)
    plan = mt.make_plan(3, 0.3, 20.0, 20.0, 4, 2, list(range(100, 110)), (300, 400), 0)
    fake = FakeStateful()
    rows, pm = asyncio.run(mtb.run_phase(_client(mtb.Stateful, fake), plan, 3))
    queries = [e for s in plan.sessions for e in s if e.kind == "query"]
    assert len(rows) == len(queries) > 0 and {r.server for r in rows} == {mt.OURS}
    assert all(r.recomputed_tokens == 0 and r.prefilled_tokens == 2 and r.context_tokens >= 12 for r in rows)
    assert pm.retries == 2 and pm.failed_queries == 0  # the 429 append, the 503 query
    assert pm.scheduler_overhead == pytest.approx(0.1) and pm.fragmentation == 0.25
    assert fake.deleted == 3 and not fake.sessions


def test_stateful_probe_counts_sessions_admitted_before_429():
    fake = FakeStateful(budget=7)
    found = asyncio.run(mtb.probe(_client(mtb.Stateful, fake), list(range(100, 110)), 5, 50, (300, 400)))
    assert found["sessions_fit"] == 7 and found["admitted"] == 7 and found["budget_blocks"] == 100.0
    assert found["first_session_recomputed_tokens"] == 0 and not fake.sessions  # probe sessions deleted
