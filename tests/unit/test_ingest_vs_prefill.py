"""The ingestion-vs-prefill benchmark's table: medians per (context, chunk), tokens/s and ours ÷ stock."""

from __future__ import annotations

import ingest_vs_prefill as ivp
import pytest

pytestmark = pytest.mark.unit


def test_table_uses_medians_and_reports_ours_over_stock():
    rows = [
        {"provider": "stateful", "context": 1000, "chunk": 100, "repeat": r, "seconds": s}
        for r, s in enumerate((0.5, 0.2, 9.0))
    ] + [
        {"provider": "vllm", "context": 1000, "chunk": 100, "repeat": r, "seconds": s}
        for r, s in enumerate((0.25, 0.1, 0.3))
    ]
    lines = ivp.table(rows).splitlines()
    assert lines[2] == "| 1000 | 100 | 200 | 400 | 0.50 |"  # medians 0.5 s and 0.25 s
    assert len(lines) == 3
