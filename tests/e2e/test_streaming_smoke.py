"""Smoke test of the streaming benchmark against the session-scoped vllm-stateful test server.

A tiny feed (40 ticks, 3 questions, 2 tokens per answer) is replayed once as session appends with
read-only queries and once as stateless full-prompt completions on the same server. Asserts on
tokens and rows only; latencies are not checked (they belong to benchmarks/).
"""

from __future__ import annotations

import pytest
import streaming_benchmark as sb
import streaming_report as rep


@pytest.mark.e2e
def test_streaming_benchmark_smoke(stateful_server, tmp_path):
    feed = rep.make_feed(n_ticks=40, n_questions=3, seed=11)
    providers = {
        kind: sb.make_provider(
            kind, kind, stateful_server.base_url, stateful_server.model, max_tokens=2, api_key=stateful_server.api_key
        )
        for kind in ("stateful", "stateless")
    }
    runs = {kind: sb.run_provider_sync(p, feed, rate=50.0) for kind, p in providers.items()}
    stateful, stateless = runs["stateful"].rows, runs["stateless"].rows

    for rows in (stateful, stateless):
        assert [r.question_idx for r in rows] == [0, 1, 2]
        ctx = [r.context_tokens for r in rows]
        assert ctx == sorted(ctx) and ctx[0] > 0
        assert all(r.completion_tokens == 2 and r.latency_s > 0 for r in rows)
    # The session query sends only the question; stateless resends the whole feed.
    assert stateful[-1].prompt_tokens_sent < stateless[-1].prompt_tokens_sent
    # Read-your-writes: the last query (after the last tick) attended to the whole feed (whether or not
    # the server counts the query's own tokens in context_tokens).
    assert stateful[-1].context_tokens >= stateless[-1].context_tokens - stateful[-1].prompt_tokens_sent
    assert runs["stateful"].recomputed_tokens == [0, 0, 0]
    # Every append was eventually seen in context_tokens, so every row has a measured lag.
    assert all(x is not None for x in runs["stateful"].append_lags)
    assert all(r.ingest_lag_s is not None and r.ingest_lag_s >= 0 for r in stateful)
    assert all(r.ingest_lag_s is None for r in stateless)
    # The benchmark deletes its session.
    sid = providers["stateful"].session_id
    assert stateful_server.get(f"/v1/sessions/{sid}").status_code == 404

    # The report pipeline works on real rows.
    rows = stateful + stateless
    assert rep.read_csv(rep.write_csv(rows, tmp_path / "s.csv")) == rows
    assert rep.plot_latency(rows, tmp_path / "s.png").stat().st_size > 0
