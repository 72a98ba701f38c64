"""Admission under KV pressure, on vLLM's own scheduler (an in-process engine with our scheduler class,
in a process of its own: ``kv_pressure_driver.py``).

When free KV blocks run low, a running ingestion cannot be held out of a step (vLLM must be able to
preempt it). The admission step then caps every request's chunk for that step (vLLM's
``long_prefill_token_threshold``) at ``ingest_share_tokens``, so a waiting request is admitted beside the
ingestion instead of waiting for all of it. The driver steps the engine one step at a time and reports
what each request got; the pool is made low as other sessions' pins make it: blocks taken out of vLLM's
free queue (``BlockPool.get_new_blocks``) and given back after.
"""

from __future__ import annotations

import pytest

from tests.e2e import kv_pressure_driver as d
from tests.e2e.stepped_engine import run_driver

pytestmark = pytest.mark.e2e


def test_a_query_is_admitted_beside_a_running_ingestion_when_blocks_run_low(tiny_model_path):
    report = run_driver("kv_pressure_driver", tiny_model_path)
    assert report["steps_to_pressure"] < 40, report  # the pool ran low ...
    assert report["ingest_left"] > d.SHARE, report  # ... while the ingestion still had more than a share to go
    # the admission step: the query computed in it, beside the ingestion, which got its share only
    assert report["query_computed_after_admission_step"] == d.QUERY_TOKENS, report
    assert report["ingest_tokens_in_admission_step"] == d.SHARE, report
    assert report["capped_admission_steps"] == 1, report
    assert report["threshold_after_step"] == report["own_threshold"], report  # vLLM's own, restored
    assert report["finished"] == {"ingest": 1, "query": 2}, report
    assert report["free_blocks_after"] == d.POOL_BLOCKS - 1, report  # every block back
