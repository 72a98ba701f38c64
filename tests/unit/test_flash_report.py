"""Unit tests for the flash-query benchmark's pure summary logic (percentiles per feed third, answer
freshness, ablation shares, CSV and Markdown) and its flash provider against an in-memory fake server
(``httpx.MockTransport``; no engine, no timing assertions). The machine line: ``test_harness.py``."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time

import flash_benchmark as fb
import flash_report as fr
import httpx
import pytest
import streaming_report as rep
from harness.results import columns_of, write_rows

from tests.unit.test_streaming_report import FakeServer

pytestmark = pytest.mark.unit


def _row(provider, i, ctx, lat, third="early", behind=None, stale=None, age=None):
    return fr.FlashRow(provider, i, ctx, ctx, lat, lat, 2, None, after_tick=i, third=third, versions_behind=behind,
                       stale=stale, answer_age_s=age)  # fmt: skip


def test_third_of_splits_the_feed_in_three():
    assert [fr.third_of(i, 9) for i in range(9)] == ["early"] * 3 + ["middle"] * 3 + ["late"] * 3
    assert fr.third_of(0, 1) == "early" and fr.third_of(39, 40) == "late"
    with pytest.raises(ValueError):
        fr.third_of(9, 9)


def test_versions_behind():
    assert fr.versions_behind(7, 5) == 2 and fr.versions_behind(3, 3) == 0
    assert fr.versions_behind(None, 1) is None and fr.versions_behind(4, None) is None


def test_latency_table_per_provider_third_and_all():
    rows = [
        _row("flash", 0, 100, 0.01),
        _row("flash", 1, 300, 0.03, "late"),
        _row("flash", 2, 350, 0.05, "late"),
        _row("vllm-prefix-cache", 0, 100, 1.0),
    ]
    stats = {(s.provider, s.third): s for s in fr.latency_table(rows)}
    assert list(stats) == [("flash", "early"), ("flash", "late"), ("flash", "all"), ("vllm-prefix-cache", "early"),
                           ("vllm-prefix-cache", "all")]  # fmt: skip
    late = stats["flash", "late"]
    assert (late.n, late.ctx_min, late.ctx_max) == (2, 300, 350)
    assert late.p50_s == pytest.approx(0.04) and late.p95_s == pytest.approx(0.049)
    assert stats["flash", "all"].n == 3 and stats["flash", "all"].p50_s == pytest.approx(0.03)


def test_freshness_counts_only_flash_rows():
    rows = [
        _row("flash", 0, 10, 0.01, behind=0, stale=False, age=0.5),
        _row("flash", 1, 20, 0.01, behind=3, stale=True, age=1.5),
        _row("flash", 2, 30, 0.01, behind=0, stale=False, age=2.5),
        _row("flash", 3, 40, 0.01, behind=None, stale=True),  # no answer yet
        _row("stateful-query", 0, 10, 0.5, behind=99),
    ]
    f = fr.freshness(rows)
    assert (f.n, f.answered, f.max_behind) == (4, 3, 3)
    assert f.mean_behind == pytest.approx(1.0) and f.share_fresh == pytest.approx(2 / 3)
    assert f.share_stale == pytest.approx(0.5) and f.answer_age_p50_s == pytest.approx(1.5)
    empty = fr.freshness([_row("vllm-prefix-cache", 0, 10, 1.0)])
    assert empty.n == 0 and empty.mean_behind is None and empty.share_stale is None


def test_ablation_log_shares_add_up_to_one():
    a = fr.ablation(8.0, 2.0, 1.0)
    assert (a.speedup_total, a.speedup_kv, a.speedup_flash) == (8.0, 4.0, 2.0)
    assert a.share_kv == pytest.approx(2 / 3) and a.share_flash == pytest.approx(1 / 3)
    b = fr.ablation(1.0, 2.0, 0.01)  # stateful query slower than prefix cache: negative KV share
    assert b.share_kv == pytest.approx(math.log(0.5) / math.log(100)) and b.share_kv < 0
    assert b.share_kv + b.share_flash == pytest.approx(1.0)
    none = fr.ablation(1.0, 1.0, 2.0)  # no total speed-up to split
    assert none.share_kv is None and none.share_flash is None and none.speedup_total == 0.5
    with pytest.raises(ValueError):
        fr.ablation(1.0, 0.0, 1.0)


def test_ablation_table_only_where_all_three_providers_answered():
    rows = [_row(p, i, 100, lat, third) for p, lat in (("vllm-prefix-cache", 4.0), ("stateful-query", 1.0),
            ("flash", 0.25)) for i, third in enumerate(("early", "late"))]  # fmt: skip
    rows.append(_row("vllm-prefix-cache", 9, 50, 4.0, "middle"))
    abl = fr.ablation_table(fr.latency_table(rows))
    assert [a.third for a in abl] == ["early", "late", "all"]
    assert all(a.share_kv == pytest.approx(0.5) and a.speedup_total == pytest.approx(16) for a in abl)


def test_csv_and_markdown(tmp_path):
    rows = [_row(p, 0, 100, lat) for p, lat in (("vllm-prefix-cache", 2.0), ("stateful-query", 1.0), ("flash", 0.5))]
    rows[2].versions_behind, rows[2].stale = 0, False
    path = write_rows(rows, tmp_path / "x" / "flash.csv", columns_of(fr.FlashRow))
    with path.open() as f:
        recs = list(csv.DictReader(f))
    assert list(recs[0]) == list(columns_of(fr.FlashRow))  # FlashRow field order, QueryRow's fields first
    committed = "benchmarks/results/flash/flash.csv"  # the schema of the committed results, spelled out
    assert ",".join(recs[0]) == (
        "provider,question_idx,context_tokens,prompt_tokens_sent,latency_s,ttft_s,completion_tokens,ingest_lag_s,"
        "after_tick,third,current_version,answer_version,versions_behind,stale,confidence,answer_age_s,"
        "evaluations,flash_error,flash_hit"
    ), committed
    assert [r["provider"] for r in recs] == ["vllm-prefix-cache", "stateful-query", "flash"]
    assert recs[2]["versions_behind"] == "0" and recs[0]["versions_behind"] == "" and recs[0]["third"] == "early"
    stats = fr.latency_table(rows)
    md = fr.markdown_report(stats, fr.freshness(rows), fr.ablation_table(stats), "machine: cpu")
    assert "| flash | early | 1 | 100-100 | 0.5000 | 0.5000 |" in md
    assert "answered 1/1, mean 0.00, max 0, 0 behind 100%" in md
    assert "| early | 2.0000 | 1.0000 | 0.5000 | 2.0 | 2.0 | 4.0 | 0.50 | 0.50 |" in md
    assert md.rstrip().endswith("machine: cpu")


# ---------------------------------------------------------------- flash provider on a fake server


class FlashFake(FakeServer):
    """``FakeServer`` plus versions on appends and flash-query routes; an answer lags by half a version."""

    def __init__(self):
        super().__init__()
        self.versions: dict[str, int] = {}
        self.flash: dict[str, dict] = {}

    async def __call__(self, req: httpx.Request) -> httpx.Response:
        path = req.url.path
        if "/flash_queries" in path:
            sid = path.split("/")[3]
            if req.method == "POST":
                fid = f"fq-{len(self.flash)}"
                self.flash[fid] = json.loads(req.content)
                return httpx.Response(201, json={"id": fid, "version": 0})
            v = self.versions.get(sid, 0)
            body = {"answer": "ab", "version": v // 2, "stale": v // 2 < v, "confidence": 0.9,
                    "computed_at": time.time(), "evaluations": v, "answer_token_ids": [1, 2]}  # fmt: skip
            return httpx.Response(200, json=body)
        resp = await super().__call__(req)
        if path.endswith("/append") and resp.status_code == 202:
            sid = path.split("/")[3]
            self.versions[sid] = self.versions.get(sid, 0) + 1
            return httpx.Response(202, json={"id": sid, "version": self.versions[sid], "queued_tokens": 0})
        return resp


def test_flash_provider_reads_cached_answers_and_freshness():
    feed = rep.make_feed(30, 4, seed=2)
    server = FlashFake()
    prov = fb.FlashProvider("flash", "http://fake/v1", None, 3)
    prov.client = httpx.AsyncClient(transport=httpx.MockTransport(server))
    prov.poll_interval_s, prov.settle_s = 0.001, 0.05
    run = asyncio.run(fb.sb.run_provider(prov, feed, rate=2000.0))
    rows = fb.to_rows(run, prov.extras, feed)
    distinct = list(dict.fromkeys(q.prompt for q in feed.questions))
    assert [b["prompt"] for b in server.flash.values()] == distinct
    assert all(b["max_tokens"] == 3 and b["ignore_eos"] is True for b in server.flash.values())
    assert not any(e[0] == "ask" for e in server.events)  # no completion was sent for a question
    words = [FakeServer.count(t.line) for t in feed.ticks]
    for r, q in zip(rows, feed.questions):
        v = q.after_tick + 1  # one version per acknowledged append
        assert (r.current_version, r.answer_version, r.versions_behind) == (v, v // 2, v - v // 2)
        assert r.context_tokens == sum(words[: q.after_tick + 1]) + FakeServer.count(q.prompt)
        assert r.prompt_tokens_sent == 0 and r.completion_tokens == 2 and r.stale is True
        assert r.third == fr.third_of(q.after_tick, 30) and r.answer_age_s >= 0
        assert r.evaluations == v and r.flash_error is None
    assert len(server.deleted) == 1


class HitFake(FakeServer):
    """``FakeServer`` whose session queries report a flash-cache hit."""

    def _sse(self, prompt_tokens: int, session: dict | None) -> httpx.Response:
        return super()._sse(prompt_tokens, session and {**session, "flash_hit": True})


def test_stateful_query_records_flash_hit_from_the_streamed_session():
    feed = rep.make_feed(12, 3, seed=1)
    prov = fb.StatefulQuery("stateful-query", "http://fake/v1", None, 2)
    prov.client = httpx.AsyncClient(transport=httpx.MockTransport(HitFake()))
    prov.poll_interval_s, prov.settle_s = 0.001, 0.05
    run = asyncio.run(fb.sb.run_provider(prov, feed, rate=2000.0))
    rows = fb.to_rows(run, prov.extras, feed)
    assert len(rows) == len(feed.questions) and all(r.flash_hit is True for r in rows)
    assert all(r.provider == "stateful-query" and r.third in fr.THIRDS for r in rows)
