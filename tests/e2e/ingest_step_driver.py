"""Run by ``test_ingest_step_target.py`` in a process of its own (``stepped_engine``), on an engine with an
ingestion step time target: reports the tokens each step of an ingestion got.

    python -m tests.e2e.ingest_step_driver MODEL_DIR
"""

from __future__ import annotations

import sys

from tests.e2e.stepped_engine import computed, print_report, stepped_llm

BUDGET = 512  # vLLM's step budget
STEP_TOKENS = 256  # ingest_step_tokens: the time target's bound never exceeds it
FLOOR = 16  # ingest_share_tokens: the time target's bound never goes under it
TARGET_MS = 600_000  # no step takes 10 minutes: the bound grows as fast as it may
TIGHT_TARGET_S = 1e-6  # every step takes longer: the bound falls to the floor
INGEST_TOKENS = 1200


def _ingest(engine, scheduler, request_id: str) -> list[int]:
    """Tokens computed in each step of one ingestion request, until it finishes."""
    from vllm import SamplingParams

    from vllm_stateful.engine.work_classes import CLASS_KEY, INGEST

    prompt = [(7 * i + len(request_id)) % 3000 + 10 for i in range(INGEST_TOKENS)]  # no prefix-cache hit
    params = SamplingParams(max_tokens=1, extra_args={CLASS_KEY: INGEST})
    engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    steps, done = [], 0
    for _ in range(400):
        engine.step()
        now = computed(scheduler, request_id) or INGEST_TOKENS  # 0 once gone: finished, all computed
        if now > done:
            steps.append(now - done)
            done = now
        if not engine.has_unfinished_requests():
            break
    return steps


def main() -> int:
    llm = stepped_llm(
        sys.argv[1],
        {"ingest_share_tokens": FLOOR, "ingest_step_tokens": STEP_TOKENS, "ingest_step_target_ms": TARGET_MS},
        max_model_len=2048,
        max_num_batched_tokens=BUDGET,
        async_scheduling=False,  # each step measured before the next is planned (vLLM's CPU default)
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    counters = scheduler.session_control.counters
    report = {"growing": _ingest(engine, scheduler, "grow")}
    report["bounded_tokens"] = counters["ingest_bounded_tokens"]
    # the same engine, its target now below any step's time (as a slower machine or a longer context would
    # make it): the measured times shrink the bound
    scheduler.step_policy.step_sizer.target_s = TIGHT_TARGET_S
    report["shrinking"] = _ingest(engine, scheduler, "shrink")
    report["bounded_steps"] = counters["ingest_bounded_steps"]
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
