"""Unit tests for the streaming benchmark's pure helpers and its driver (against an in-memory fake
server through ``httpx.MockTransport``; no engine, no timing assertions)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import streaming_benchmark as sb
import streaming_report as rep
from harness.http import BenchError

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- feed


def test_feed_is_deterministic_per_seed():
    a, b, c = rep.make_feed(100, 8, seed=3), rep.make_feed(100, 8, seed=3), rep.make_feed(100, 8, seed=4)
    assert a == b
    assert [t.line for t in a.ticks] != [t.line for t in c.ticks]
    assert a.questions != c.questions


def test_tick_lines_have_the_documented_shape():
    feed = rep.make_feed(70, 3, seed=0)
    assert feed.ticks[0].line.startswith("09:30:01 ")
    assert feed.ticks[69].clock == "09:31:10"
    for t in feed.ticks:
        clock, sym, price, change = t.line.rstrip("\n").split(" ")
        assert t.line.endswith("\n") and sym in rep.DEFAULT_SYMBOLS
        assert float(price) == pytest.approx(t.price) and change.endswith("%") and change[0] in "+-"
    assert feed.text_through(2) == "".join(t.line for t in feed.ticks[:3])


@pytest.mark.parametrize("n_ticks,n_q,seed", [(10, 10, 0), (40, 3, 1), (300, 24, 0), (7, 1, 5)])
def test_question_points_increasing_and_end_at_last_tick(n_ticks, n_q, seed):
    feed = rep.make_feed(n_ticks, n_q, seed=seed)
    pts = [q.after_tick for q in feed.questions]
    assert len(pts) == n_q and pts[-1] == n_ticks - 1
    assert all(a < b for a, b in zip(pts, pts[1:])) and pts[0] >= 0
    assert [q.idx for q in feed.questions] == list(range(n_q))
    assert all(q.prompt == f"\nQ: {q.text}\nA:" for q in feed.questions)


def test_question_points_rejects_more_questions_than_ticks():
    with pytest.raises(ValueError):
        rep.make_feed(3, 4)


# ---------------------------------------------------------------- statistics


def test_percentile_matches_linear_interpolation():
    assert rep.percentile([5.0], 95) == 5.0
    assert rep.percentile([1, 2, 3, 4], 50) == 2.5
    assert rep.percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert rep.percentile([3, 1, 2], 0) == 1 and rep.percentile([3, 1, 2], 100) == 3
    with pytest.raises(ValueError):
        rep.percentile([], 50)


def test_bucket_labels():
    assert rep.bucket_label(0) == "0-1k"
    assert rep.bucket_label(999) == "0-1k"
    assert rep.bucket_label(1000) == "1-2k"
    assert rep.bucket_label(7999) == "6-8k"
    assert rep.bucket_label(8000) == "8k+"
    assert rep.bucket_label(1500, [0, 512, 2048]) == "0.512-2.048k"
    with pytest.raises(ValueError):
        rep.bucket_label(-1)


def _row(p, i, ctx, lat, lag=None):
    return rep.QueryRow(p, i, ctx, ctx, lat, lat / 2, 8, lag)


def test_bucket_table_groups_by_provider_and_bucket():
    rows = [
        _row("a", 0, 500, 1.0),
        _row("a", 1, 900, 3.0),
        _row("a", 2, 4500, 10.0),
        _row("b", 0, 500, 0.5),
        _row("a", 3, 1200, 2.0),
    ]
    table = rep.bucket_table(rows)
    assert [(b.provider, b.bucket, b.n) for b in table] == [
        ("a", "0-1k", 2),
        ("a", "1-2k", 1),
        ("a", "4-5k", 1),
        ("b", "0-1k", 1),
    ]
    assert table[0].p50_s == 2.0 and table[0].p95_s == pytest.approx(2.9)


def test_latency_at_takes_median_of_nearest():
    rows = [
        _row("a", i, c, lat)
        for i, (c, lat) in enumerate([(100, 1.0), (900, 2.0), (1100, 4.0), (1300, 9.0), (5000, 20.0)])
    ]
    assert rep.latency_at(rows, 1000, k=3) == (4.0, 1100)
    assert rep.latency_at(rows, 6000, k=1) == (20.0, 5000)


def test_summarize_ratios_and_speedups():
    rows = []
    for i, ctx in enumerate([1000, 2000, 3000, 4000]):
        rows.append(_row("stateful", i, ctx, 0.5 + 0.0 * ctx, lag=0.1))
        rows.append(_row("nocache", i, ctx + 10, ctx / 1000))
    summaries, largest = rep.summarize(rows, {"stateful": [0.1, 0.2, 0.3]}, ref_tokens=1000, k=1)
    by = {s.provider: s for s in summaries}
    assert largest == 4000  # the smallest of the providers' largest contexts
    assert by["stateful"].growth == pytest.approx(1.0)
    assert by["nocache"].growth == pytest.approx(4.0)
    assert by["nocache"].ingest_lag_p50_s is None and by["stateful"].ingest_lag_p50_s == pytest.approx(0.2)
    assert rep.speedups(summaries, "stateful") == {"nocache": pytest.approx(8.0)}
    line = rep.summary_line(summaries, largest, "stateful")
    assert "8.0x vs nocache" in line and "nocache 4.00x" in line and "\n" not in line
    md = rep.markdown_report(rep.bucket_table(rows), summaries, largest, "stateful")
    assert "| nocache | 4-5k | 1 | 4.000 | 4.000 |" in md and line in md


def test_ingest_lags_first_covering_sample_after_ack():
    acks = [1.0, 2.0, 3.0, 4.0]
    targets = [10, 20, 30, 40]
    samples = [(0.5, 10), (1.2, 10), (2.1, 15), (2.6, 30), (3.5, 30), (4.5, 35)]
    # append 0 covered at 1.2 (0.5 is before its ack); 1 and 2 both at 2.6 / 3.5; 3 never.
    lags = rep.ingest_lags(acks, targets, samples)
    assert lags[0] == pytest.approx(0.2)
    assert lags[1] == pytest.approx(0.6)
    assert lags[2] == pytest.approx(0.5)
    assert lags[3] is None


# ---------------------------------------------------------------- files


def test_csv_round_trip(tmp_path):
    rows = [
        rep.QueryRow("vllm-stateful", 0, 1234, 19, 0.25, 0.2, 8, 0.05),
        rep.QueryRow("vllm-no-cache", 0, 1234, 1253, 3.5, None, 8, None),
    ]
    path = rep.write_csv(rows, tmp_path / "sub" / "s.csv")
    # the schema of the committed results (benchmarks/results/streaming*/streaming.csv), spelled out
    schema = "provider,question_idx,context_tokens,prompt_tokens_sent,latency_s,ttft_s,completion_tokens,ingest_lag_s"
    assert path.read_text().splitlines()[0] == ",".join(rep.CSV_FIELDS) == schema
    assert rep.read_csv(path) == rows


def test_png_written(tmp_path):
    rows = [_row("a", 0, 100, 0.1), _row("a", 1, 2000, 0.4), _row("b", 0, 100, 0.2), _row("b", 1, 2000, 3.0)]
    path = rep.plot_latency(rows, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ---------------------------------------------------------------- driver on a fake server


class FakeServer:
    """Enough of the API.md contract: sessions, append (first one answered 429), read-only queries,
    /tokenize counting whitespace-separated words. Ingestion is immediate."""

    def __init__(self):
        self.sessions: dict[str, int] = {}
        self.deleted: list[str] = []
        self.events: list[tuple[str, str]] = []  # ("append", line) / ("ask", prompt)
        self.rejected_once = False

    @staticmethod
    def count(text: str) -> int:
        return len(text.split())

    def _sse(self, prompt_tokens: int, session: dict | None) -> httpx.Response:
        chunks = [
            {"choices": [{"index": 0, "text": "x"}]},
            {"choices": [{"index": 0, "text": "y"}]},
            {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 2}},
        ]
        if session:
            chunks[-1]["session"] = session
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    async def __call__(self, req: httpx.Request) -> httpx.Response:
        path, body = req.url.path, json.loads(req.content or b"{}")
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake"}]})
        if path == "/tokenize":
            return httpx.Response(200, json={"count": self.count(body["prompt"])})
        if path == "/v1/sessions" and req.method == "POST":
            self.sessions[body["id"]] = 0
            return httpx.Response(201, json={"id": body["id"], "version": 0, "context_tokens": 0})
        if path.startswith("/v1/sessions/"):
            sid = path.split("/")[3]
            if path.endswith("/append"):
                if not self.rejected_once:
                    self.rejected_once = True
                    return httpx.Response(429, headers={"Retry-After": "0.01"}, json={"error": {"message": "full"}})
                self.sessions[sid] += self.count(body["text"])
                self.events.append(("append", body["text"]))
                return httpx.Response(202, json={"id": sid, "version": 1, "queued_tokens": 0})
            if req.method == "DELETE":
                self.deleted.append(sid)
                return httpx.Response(200, json={"id": sid, "deleted": True, "freed_blocks": 0})
            return httpx.Response(200, json={"id": sid, "context_tokens": self.sessions[sid]})
        if path == "/v1/completions":
            await asyncio.sleep(0.005)  # a slow receiver: the feed must not overtake the question
            n = self.count(body["prompt"])
            sid = body.get("stateful")
            if sid is None:
                if body["prompt"] != "warm up":
                    self.events.append(("warm" if body["max_tokens"] == 1 else "ask", body["prompt"]))
                return self._sse(n, None)
            assert body["stateful_commit"] is False
            self.events.append(("ask", body["prompt"]))
            return self._sse(
                n,
                {
                    "id": sid,
                    "version": 1,
                    "context_tokens": self.sessions[sid] + n,
                    "new_tokens": n,
                    "recomputed_tokens": 0,
                    **({"versions_behind": 1, "staleness_ms": 300} if body.get("consistency") == "ingested" else {}),
                },
            )
        return httpx.Response(404, json={"error": {"message": path}})


def _run(kind: str, feed: rep.Feed, server: FakeServer) -> sb.ProviderRun:
    prov = sb.make_provider(kind, kind, "http://fake/v1", None, 2, poll_interval_s=0.001)
    prov.client = httpx.AsyncClient(transport=httpx.MockTransport(server))
    if kind.startswith("stateful"):
        prov.settle_s = 0.05
    return asyncio.run(sb.run_provider(prov, feed, rate=2000.0))


def test_stateful_driver_rows_lags_and_cleanup():
    feed = rep.make_feed(30, 4, seed=2)
    server = FakeServer()
    run = _run("stateful", feed, server)
    words = [FakeServer.count(t.line) for t in feed.ticks]
    assert [r.question_idx for r in run.rows] == [0, 1, 2, 3]
    # Alignment: each question attended to exactly the ticks up to its point (plus itself).
    assert [r.context_tokens for r in run.rows] == [
        sum(words[: q.after_tick + 1]) + FakeServer.count(q.prompt) for q in feed.questions
    ]
    assert [r.prompt_tokens_sent for r in run.rows] == [FakeServer.count(q.prompt) for q in feed.questions]
    assert run.append_retries == 1 and run.token_accounting == "exact"
    assert len(run.append_lags) == 30 and all(x is not None and x >= 0 for x in run.append_lags)
    assert all(r.ingest_lag_s == run.append_lags[q.after_tick] for r, q in zip(run.rows, feed.questions))
    assert run.recomputed_tokens == [0, 0, 0, 0] and all(r.completion_tokens == 2 for r in run.rows)
    assert len(server.deleted) == 1 and [e[1] for e in server.events if e[0] == "append"] == [
        t.line for t in feed.ticks
    ]
    # Every question is received after its tick and before the next one.
    order = [e[0] for e in server.events]
    for q in feed.questions:
        assert order[q.after_tick + 1 + q.idx] == "ask"


def test_stateless_driver_sends_the_full_feed():
    feed = rep.make_feed(30, 4, seed=2)
    server = FakeServer()
    run = _run("stateless", feed, server)
    prompts = [e[1] for e in server.events if e[0] == "ask"]
    assert prompts == [feed.text_through(q.after_tick) + q.prompt for q in feed.questions]
    words = [FakeServer.count(t.line) for t in feed.ticks]
    assert (
        [r.context_tokens for r in run.rows]
        == [r.prompt_tokens_sent for r in run.rows]
        == [sum(words[: q.after_tick + 1]) + FakeServer.count(q.prompt) for q in feed.questions]
    )
    assert all(r.ingest_lag_s is None for r in run.rows) and run.append_lags == []


def test_warming_driver_keeps_the_prefix_cache_warm_and_still_sends_the_full_feed():
    feed = rep.make_feed(30, 4, seed=2)
    server = FakeServer()
    run = _run("stateless-warming", feed, server)
    asks = [e[1] for e in server.events if e[0] == "ask"]
    assert asks == [feed.text_through(q.after_tick) + q.prompt for q in feed.questions]
    warms = [e[1] for e in server.events if e[0] == "warm"]
    # every 4th tick at most (one in flight at a time), each the feed through that tick
    assert 1 <= len(warms) == run.warm_requests <= 30 // 4
    assert all(w in {feed.text_through(i) for i in range(3, 30, 4)} for w in warms)


def test_ingested_driver_asks_without_waiting_and_records_how_far_behind():
    feed = rep.make_feed(30, 4, seed=2)
    server = FakeServer()
    run = _run("stateful-ingested", feed, server)
    assert [r.question_idx for r in run.rows] == [0, 1, 2, 3]
    assert run.versions_behind == [1, 1, 1, 1] and run.staleness_ms == [300, 300, 300, 300]
    assert "1.0 versions behind" in sb.run_notes([run]) and "0.3 s old at the median" in sb.run_notes([run])
    assert sb.run_details(run)["staleness_ms_max"] == 300


def test_driver_surfaces_server_errors_and_still_closes():
    feed = rep.make_feed(10, 2, seed=0)
    server = FakeServer()
    server.rejected_once = True
    orig = server.__call__

    async def broken(req):
        if req.url.path == "/v1/completions" and b"stateful" in req.content:
            return httpx.Response(400, json={"error": {"message": "bad"}})
        return await orig(req)

    prov = sb.make_provider("stateful", "s", "http://fake/v1", None, 2)
    prov.client = httpx.AsyncClient(transport=httpx.MockTransport(broken))
    with pytest.raises(BenchError, match="400"):
        asyncio.run(sb.run_provider(prov, feed, rate=2000.0))
    assert len(server.deleted) == 1
