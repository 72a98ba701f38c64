"""The bound on an ingestion-only step: by tokens, and by a wall-time target (engine/ingest_step.py)."""

from __future__ import annotations

import pytest

from vllm_stateful.engine.ingest_step import IngestStepSizer

pytestmark = pytest.mark.unit


def _run(sizer: IngestStepSizer, fixed_s: float, per_token_s: float, steps: int, budget: int = 2048) -> list[int]:
    """Bounds of ``steps`` bounded steps on a machine where a step of n tokens takes fixed + n * per_token."""
    bounds = []
    for _ in range(steps):
        n = sizer.bound(budget)
        bounds.append(n)
        sizer.observe(n, fixed_s + n * per_token_s)
    return bounds


def test_without_a_target_the_bound_is_the_token_bound_or_the_budget():
    assert IngestStepSizer(512, 0.0, 64).bound(2048) == 512
    assert IngestStepSizer(512, 0.0, 64).bound(256) == 256  # never above vLLM's budget
    assert IngestStepSizer(0, 0.0, 64).bound(2048) == 2048  # no bound at all
    sizer = IngestStepSizer(512, 0.0, 64)
    sizer.observe(512, 60.0)  # measurements change nothing without a target
    assert sizer.bound(2048) == 512


def test_on_a_slow_machine_steps_shrink_to_the_target_and_stay_above_the_floor():
    # ~0.5B model on a 2-core CPU: 0.1 s a step + 25 ms a token; target 1 s -> (1 - 0.1) / 0.025 = 36 tokens
    sizer = IngestStepSizer(512, 1.0, 16)
    bounds = _run(sizer, 0.1, 0.025, 20)
    assert bounds[0] == 16  # nothing measured yet: the floor
    assert max(bounds) <= 64 and 33 <= bounds[-1] <= 37
    assert 0.9 <= 0.1 + bounds[-1] * 0.025 <= 1.03  # the step's time is the target
    slow = IngestStepSizer(512, 1.0, 64)  # the target is under one floor step: the floor holds
    assert _run(slow, 0.1, 0.025, 10)[-1] == 64


def test_on_a_fast_machine_steps_grow_at_most_twice_a_step_to_the_token_bound():
    sizer = IngestStepSizer(512, 0.5, 64)
    bounds = _run(sizer, 0.01, 0.00002, 8)
    assert bounds == [64, 128, 256, 512, 512, 512, 512, 512]
    unbounded = IngestStepSizer(0, 0.5, 64)  # no token bound: up to vLLM's budget
    assert unbounded.bound(2048) == 64 and _run(unbounded, 0.01, 2e-5, 7)[-1] == 2048


def test_a_dearer_token_is_followed_at_once_not_averaged():
    sizer = IngestStepSizer(4096, 1.0, 8)
    before = _run(sizer, 0.05, 0.002, 12, budget=4096)[-1]  # ~475 tokens a second
    after = _run(sizer, 0.05, 0.02, 3, budget=4096)  # attention over a longer context: 10x a token
    assert 450 <= before <= 480
    assert 450 <= after[0] <= 480 and 0.05 + after[1] * 0.02 <= 1.05  # one slow step, then back at the target
    assert 0.05 + after[-1] * 0.02 <= 1.05


def test_without_a_token_bound_steps_at_the_full_budget_are_still_measured():
    sizer = IngestStepSizer(0, 0.5, 64)
    assert _run(sizer, 0.01, 2e-5, 8)[-1] == 2048 and sizer.applies(2048)  # grown to vLLM's budget
    later = _run(sizer, 0.01, 2e-3, 3)  # longer contexts: each token 100x dearer
    assert later[0] == 2048 and later[1] <= 250 and 0.01 + later[-1] * 2e-3 <= 0.55
    assert not IngestStepSizer(0, 0.0, 64).applies(2048) and IngestStepSizer(512, 0.0, 64).applies(2048)


def test_a_short_step_within_the_target_leaves_the_bound_alone():
    # GPU-like: 20 ms a step + 0.05 ms a token; target 0.1 s -> 1600 tokens
    sizer = IngestStepSizer(0, 0.1, 16)
    settled = _run(sizer, 0.02, 5e-5, 30, budget=8192)[-1]
    assert 1500 <= settled <= 1600
    sizer.observe(10, 0.0205)  # an ingestion's last 10 tokens, or a short append: 2 ms a token
    assert sizer.bound(8192) == settled
    sizer.observe(10, 0.5)  # a short step over the target is taken: something made steps slow
    assert sizer.bound(8192) <= 16 * 2


def test_bad_settings_are_refused():
    for args in ((-1, 0.0, 64), (512, -1.0, 64), (512, 1.0, 0)):
        with pytest.raises(ValueError):
            IngestStepSizer(*args)
