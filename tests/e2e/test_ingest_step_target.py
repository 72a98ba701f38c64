"""An ingestion step time target on vLLM's own engine loop (``ingest_step_target_ms``; an in-process
engine with our scheduler class, in a process of its own: ``ingest_step_driver.py``).

The bound on an ingestion-only step follows the wall time measured from each step's scheduling to its
output. The driver's targets are chosen so that the outcome does not depend on this machine's speed: one
no step reaches (the bound doubles each step from the floor up to ``ingest_step_tokens``), then one every
step exceeds (the bound falls to the floor after one step). Either fails if the step times do not reach the
policy, or reach it for the wrong steps.
"""

from __future__ import annotations

import pytest

from tests.e2e import ingest_step_driver as d
from tests.e2e.stepped_engine import run_driver

pytestmark = pytest.mark.e2e


def test_ingestion_steps_follow_their_measured_time(tiny_model_path):
    report = run_driver("ingest_step_driver", tiny_model_path)
    grow, shrink = report["growing"], report["shrinking"]
    assert sum(grow) == sum(shrink) == d.INGEST_TOKENS, report
    # from the floor, doubling per measured step, up to ingest_step_tokens (vLLM's budget is 512)
    assert grow[:5] == [16, 32, 64, 128, 256] and set(grow[5:-1]) == {256}, report
    assert report["bounded_tokens"] == d.INGEST_TOKENS, report  # every step of it was bounded and counted
    # the first step starts from the bound the last one left; measured, it falls to the floor
    assert shrink[0] == 256 and set(shrink[1:-1]) == {16}, report
    assert report["bounded_steps"] == len(grow) + len(shrink), report
