"""Run by ``test_ingest_step_target.py`` in a process of its own: an in-process vLLM engine with our
scheduler class and an ingestion step time target, stepped one step at a time; reports as JSON on
stdout the tokens each step of an ingestion got.

Its own process for the reason ``kv_pressure_driver.py`` gives.

    python tests/e2e/ingest_step_driver.py MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys

BLOCK = 32
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
        found = [r for rid, r in scheduler.requests.items() if rid.startswith(request_id + "-") or rid == request_id]
        now = found[0].num_computed_tokens if found else INGEST_TOKENS
        if now > done:
            steps.append(now - done)
            done = now
        if not engine.has_unfinished_requests():
            break
    return steps


def main() -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: stepped and inspected here
    from vllm import LLM

    llm = LLM(
        sys.argv[1],
        block_size=BLOCK,
        enforce_eager=True,
        max_model_len=2048,
        max_num_batched_tokens=BUDGET,
        seed=0,
        dtype="float32",
        async_scheduling=False,  # each step measured before the next is planned (vLLM's CPU default)
        scheduler_cls="vllm_stateful.engine.scheduler.StatefulScheduler",
        additional_config={
            "stateful": {
                "ingest_share_tokens": FLOOR,
                "ingest_step_tokens": STEP_TOKENS,
                "ingest_step_target_ms": TARGET_MS,
            }
        },
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
    print("REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
