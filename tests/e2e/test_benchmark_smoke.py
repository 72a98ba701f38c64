"""Smoke run of benchmarks/stateful_benchmark.py on the tiny demo model: 1 topic x 3 turns, both
the session provider and the stateless provider against the one test server. Asserts on the rows
and the CSV (token counts, schema), never on timings."""

from __future__ import annotations

from pathlib import Path

import pytest
import report
from stateful_benchmark import TOPICS, run_benchmark

pytestmark = pytest.mark.e2e

TURNS = 3
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def smoke_rows(stateful_server) -> dict[str, list[report.Row]]:
    """Rows of one short benchmark per provider, in the order stateful, stateless."""
    return {
        provider: run_benchmark(
            provider,
            stateful_server.base_url,
            stateful_server.model,
            topics=1,
            turns=TURNS,
            max_tokens=MAX_TOKENS,
            tokenizer_path=stateful_server.model_path,
            api_key=stateful_server.api_key,
        )
        for provider in ("stateful", "stateless")
    }


def test_rows_follow_the_csv_schema(smoke_rows, tmp_path: Path) -> None:
    rows = smoke_rows["stateful"] + smoke_rows["stateless"]
    path = report.write_csv(rows, tmp_path / "smoke.csv")
    assert path.read_text().splitlines()[0] == ",".join(report.CSV_FIELDS)
    assert report.read_csv(path) == rows
    for provider, got in smoke_rows.items():
        assert [(r.provider, r.topic, r.turn) for r in got] == [
            (provider, TOPICS[0].name, t) for t in range(1, TURNS + 1)
        ]
        for r in got:
            assert 1 <= r.completion_tokens <= MAX_TOKENS
            assert r.prompt_tokens > 0 and r.cached_tokens >= 0 and r.recomputed_tokens >= 0
            assert 0 <= r.ttft_s <= r.total_s


def test_cumulative_columns_are_monotone(smoke_rows) -> None:
    for got in smoke_rows.values():
        cumulative = [r.cumulative_prompt_tokens for r in got]
        assert cumulative == [sum(r.prompt_tokens for r in got[: i + 1]) for i in range(len(got))]
        assert all(a < b for a, b in zip(cumulative, cumulative[1:]))
        prefill = report.cumulative_prefill(got)
        series = [prefill[(r.provider, r.topic, r.turn)] for r in got]
        assert all(a <= b for a, b in zip(series, series[1:]))


def test_stateful_sends_only_new_tokens(smoke_rows) -> None:
    stateful, stateless = smoke_rows["stateful"], smoke_rows["stateless"]
    # Turn 1 is the same system + user prompt for both providers.
    assert stateful[0].prompt_tokens == stateless[0].prompt_tokens
    for s, full in zip(stateful[1:], stateless[1:]):
        assert s.prompt_tokens < full.prompt_tokens
        assert s.recomputed_tokens == 0
        assert s.cached_tokens > 0  # the session context was reused, not re-sent
    # The stateless prompt grows with the history; the stateful one does not.
    assert [r.prompt_tokens for r in stateless] == sorted({r.prompt_tokens for r in stateless})
    assert stateful[-1].prompt_tokens < stateful[0].prompt_tokens
    assert stateful[-1].cumulative_prompt_tokens < stateless[-1].cumulative_prompt_tokens


def test_summary_table_from_smoke_rows(smoke_rows) -> None:
    summaries = report.summarize(smoke_rows["stateful"] + smoke_rows["stateless"])
    assert [s.provider for s in summaries] == ["stateful", "stateless"]
    ratios = report.ratio_table(summaries)
    assert ratios["stateless"]["prompt_tokens"] > 1.0
