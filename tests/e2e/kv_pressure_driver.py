"""Run by ``test_kv_pressure_admission.py`` in a process of its own (``stepped_engine``): reports what
each request got, step by step, under KV pressure.

    python -m tests.e2e.kv_pressure_driver MODEL_DIR
"""

from __future__ import annotations

import sys

from tests.e2e.stepped_engine import computed, print_report, stepped_llm

BUDGET = 128  # tokens per step: a step needs BUDGET / BLOCK = 4 free blocks, plus one per running request
POOL_BLOCKS = 128
PINNED = POOL_BLOCKS - 1 - 44  # blocks held elsewhere (one is vLLM's null block): 44 left free
SHARE = 32
INGEST_TOKENS = 1400  # 44 blocks: admitted (vLLM wants the whole prompt to fit), then the pool runs low
QUERY_TOKENS = 20


def drive(engine) -> dict:
    from vllm import SamplingParams

    from vllm_stateful.engine.work_classes import CLASS_KEY, INGEST

    scheduler = engine.engine_core.engine_core.scheduler
    counters = scheduler.session_control.counters
    pool = scheduler.kv_cache_manager.block_pool
    report: dict = {"own_threshold": scheduler.scheduler_config.long_prefill_token_threshold}
    pinned = pool.get_new_blocks(PINNED)  # as other sessions' pins hold blocks
    ingest = SamplingParams(max_tokens=1, extra_args={CLASS_KEY: INGEST})
    engine.add_request("ingest", {"prompt_token_ids": [(7 * i) % 3000 + 10 for i in range(INGEST_TOKENS)]}, ingest)
    steps = 0
    while scheduler._kv_room_to_hold() and steps < 40:  # chunks of BUDGET until the pool is low
        engine.step()
        steps += 1
    report["steps_to_pressure"] = steps
    report["ingest_left"] = INGEST_TOKENS - computed(scheduler, "ingest")
    before = computed(scheduler, "ingest"), counters["ingest_capped_admission_steps"]
    query = {"prompt_token_ids": list(range(100, 100 + QUERY_TOKENS))}
    engine.add_request("query", query, SamplingParams(max_tokens=2))
    engine.step()  # the admission step
    report["query_computed_after_admission_step"] = computed(scheduler, "query")
    report["ingest_tokens_in_admission_step"] = computed(scheduler, "ingest") - before[0]
    report["capped_admission_steps"] = counters["ingest_capped_admission_steps"] - before[1]
    report["threshold_after_step"] = scheduler.scheduler_config.long_prefill_token_threshold
    finished: dict[str, int] = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                finished[out.request_id.split("-")[0]] = len(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            break
    report["finished"] = finished
    pool.free_blocks(pinned)
    report["free_blocks_after"] = pool.get_num_free_blocks()
    return report


def main() -> int:
    llm = stepped_llm(
        sys.argv[1],
        {"ingest_share_tokens": SHARE, "ingest_yield_steps": 4},
        max_model_len=2048,
        max_num_batched_tokens=BUDGET,
        num_gpu_blocks_override=POOL_BLOCKS,
    )
    print_report(drive(llm.llm_engine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
