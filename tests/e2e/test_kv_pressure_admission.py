"""Admission under KV pressure, on vLLM's own scheduler (an in-process engine with our scheduler class).

When free KV blocks run low, a running ingestion cannot be held out of a step (vLLM must be able to
preempt it). The admission step then caps every request's chunk for that step (vLLM's
``long_prefill_token_threshold``) at ``ingest_share_tokens``, so a waiting request is admitted beside the
ingestion instead of waiting for all of it. Driven one engine step at a time; asserts on the tokens each
request got per step. The pool is made low as other sessions' pins make it: blocks taken out of vLLM's
free queue (``BlockPool.get_new_blocks``) and given back after. This module's engine is its own (with
a small step budget), like the durability tests' server.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.e2e

BLOCK = 32
BUDGET = 128  # tokens per step: a step needs BUDGET / BLOCK = 4 free blocks, plus one per running request
POOL_BLOCKS = 128
PINNED = POOL_BLOCKS - 1 - 44  # blocks held elsewhere (one is vLLM's null block): 44 left free
SHARE = 32
INGEST_TOKENS = 1400  # 44 blocks: admitted (vLLM wants the whole prompt to fit), then the pool runs low


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process: the test steps it and reads its state
    from vllm import LLM

    llm = LLM(
        tiny_model_path,
        block_size=BLOCK,
        enforce_eager=True,
        max_model_len=2048,
        max_num_batched_tokens=BUDGET,
        num_gpu_blocks_override=POOL_BLOCKS,
        seed=0,
        dtype="float32",
        scheduler_cls="vllm_stateful.engine.scheduler.StatefulScheduler",
        additional_config={"stateful": {"ingest_share_tokens": SHARE, "ingest_yield_steps": 4}},
    )
    yield llm.llm_engine
    del llm
    if before is None:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before


def _computed(scheduler, request_id: str) -> int:
    """Tokens computed for the engine request made from ``request_id`` (vLLM adds a suffix to it)."""
    found = [r for rid, r in scheduler.requests.items() if rid == request_id or rid.startswith(request_id + "-")]
    assert len(found) <= 1, found
    return found[0].num_computed_tokens if found else 0


def test_a_query_is_admitted_beside_a_running_ingestion_when_blocks_run_low(engine):
    from vllm import SamplingParams

    from vllm_stateful.engine.work_classes import CLASS_KEY, INGEST

    scheduler = engine.engine_core.engine_core.scheduler
    counters = scheduler.session_control.counters
    ingest = SamplingParams(max_tokens=1, extra_args={CLASS_KEY: INGEST})
    pool = scheduler.kv_cache_manager.block_pool
    pinned = pool.get_new_blocks(PINNED)
    try:
        _admission_under_pressure(engine, scheduler, counters, ingest)
    finally:
        pool.free_blocks(pinned)
    assert pool.get_num_free_blocks() == POOL_BLOCKS - 1  # everything back


def _admission_under_pressure(engine, scheduler, counters, ingest) -> None:
    from vllm import SamplingParams

    own_threshold = scheduler.scheduler_config.long_prefill_token_threshold
    engine.add_request("ingest", {"prompt_token_ids": [(7 * i) % 3000 + 10 for i in range(INGEST_TOKENS)]}, ingest)
    steps = 0
    while scheduler._kv_room_to_hold():  # chunks of BUDGET until the pool is low
        engine.step()
        steps += 1
        assert steps < 40 and _computed(scheduler, "ingest") < INGEST_TOKENS, "the pool never ran low"
    left = INGEST_TOKENS - _computed(scheduler, "ingest")
    assert left > SHARE, left  # the ingestion still runs, with more than a share to go

    before = _computed(scheduler, "ingest"), counters["ingest_capped_admission_steps"]
    engine.add_request("query", {"prompt_token_ids": list(range(100, 120))}, SamplingParams(max_tokens=2))
    engine.step()  # the admission step
    # the query was admitted in this step, beside the ingestion, which got its share only
    assert _computed(scheduler, "query") == 20
    assert _computed(scheduler, "ingest") - before[0] == SHARE
    assert counters["ingest_capped_admission_steps"] == before[1] + 1
    assert scheduler.scheduler_config.long_prefill_token_threshold == own_threshold  # restored after the step
    outputs: dict[str, list[int]] = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                outputs[out.request_id.split("-")[0]] = list(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            break
    assert set(outputs) == {"ingest", "query"} and len(outputs["query"]) == 2
