"""Unit tests for the per-request profile's pure helpers: stage classification, the per-round medians'
table, the A/B comparison and its CSV rows (no server, no py-spy)."""

from __future__ import annotations

import profile_request as pr
import pytest

pytestmark = pytest.mark.unit


def _measured(context: int, overhead_ms: float, forward_ms: float, p50_ms: float) -> pr.Measured:
    stages = {"ipc_serialization": overhead_ms / 1000, "forward_attention": forward_ms / 1000}
    return pr.Measured(context, 30, p50_ms / 1000, p50_ms / 1000, stages, (overhead_ms / 1000,) * 3)


def test_stacks_are_classified_innermost_first_and_busy_polls_win():
    assert pr.stage_of(["main (x.py:1)", "preprocess_add_request (core.py:1)", "hash_block_tokens (k.py:1)"]) == (
        "engine_block_hashing"
    )
    assert pr.stage_of(["execute_model (w.py:1)", "SpinCondition.wait (q.py:1)"]) == "worker_busy_poll"
    assert pr.stage_of(["nothing (a.py:1)"]) == "other"
    assert pr.tally("a (x.py:1);poll (sel.py:2) 7\nb (y.py:1);msgspec (m.py:3) 2\n") == {
        "idle_loop": 7,
        "ipc_serialization": 2,
    }


def test_forward_is_not_overhead_and_the_comparison_shows_both_sides():
    whole = [_measured(1000, 10.0, 1.0, 20.0), _measured(32000, 30.0, 9.0, 60.0)]
    referenced = [_measured(1000, 10.0, 1.0, 20.0), _measured(32000, 11.0, 9.0, 30.0)]
    assert whole[1].overhead_s() == pytest.approx(0.030)  # forward_attention left out
    text = pr.comparison({"whole (off)": whole, "referenced (on)": referenced})
    assert "| whole (off) | 10.00 | 30.00 | 3.00x | 3.00x |" in text
    assert "| referenced (on) | 10.00 | 11.00 | 1.10x | 1.50x |" in text
    rows = pr.csv_rows(referenced, "on")
    assert {r["prefix_references"] for r in rows} == {"on"}
    assert {"context_tokens": 32000, "stage": "client_latency_p50", "cpu_s_per_request": "0.030000"} in [
        {k: v for k, v in r.items() if k != "prefix_references"} for r in rows
    ]
    assert "prefix_references" not in pr.csv_rows(whole)[0]
    assert "32000: 30.0, 30.0, 30.0" in pr.table(whole)
