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
    assert pr.stage_of(["execute_model (w.py:1)", "SpinCondition.wait (q.py:1)"]) == "busy_poll"
    # spinning in the ring's read loop is a wait; the message's unpickling (in ``dequeue``) is not
    ring = ["worker_busy_loop (m.py:1)", "MessageQueue.dequeue (shm_broadcast.py:971)", "__enter__ (contextlib.py:1)"]
    assert pr.stage_of([*ring, "MessageQueue.acquire_read (shm_broadcast.py:864)"]) == "busy_poll"
    assert pr.stage_of(["worker_busy_loop (m.py:1)", "MessageQueue.dequeue (shm_broadcast.py:984)"]) == (
        "ipc_serialization"
    )
    # a thread without a Python frame: a stack read mid-change
    assert pr.stage_of(['process 1:"serve"', 'process 2:"VLLM::EngineCore"', 'process 3:"VLLM::Worker"']) == (
        "unreadable_stack"
    )
    # the worker's bookkeeping for a step is overhead, though it runs under execute_model
    step = ["execute_model (vllm/v1/worker/gpu_model_runner.py:1)", "_update_states (gpu_model_runner.py:2)"]
    assert pr.stage_of([*step, "InputBatch.add_request (vllm/v1/worker/gpu_input_batch.py:371)"]) == (
        "worker_bookkeeping"
    )
    assert "worker_bookkeeping" in pr.OVERHEAD_STAGES
    # the event loop's own frame innermost is its epoll wait; a coroutine under it is not
    assert pr.stage_of(['process 1:"serve"', "Runner.run (asyncio/runners.py:118)"]) == "event_loop_wait"
    assert pr.stage_of(["Runner.run (asyncio/runners.py:118)", "AsyncLLM.generate (async_llm.py:1)"]) == "other"
    assert not {"busy_poll", "event_loop_wait", "unreadable_stack", "idle_loop"} & set(pr.OVERHEAD_STAGES)
    assert "other" in pr.OVERHEAD_STAGES and "unsampled" in pr.OVERHEAD_STAGES
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


def test_each_process_cpu_time_is_split_by_its_samples_that_used_cpu():
    raw = (
        'process 7:"serve";uvicorn.run (u.py:1) 30\n'
        'process 7:"serve";Runner.run (asyncio/runners.py:118) 70\n'  # blocked in epoll: no CPU share
        'process 7:"serve";process 8:"VLLM::EngineCore";schedule (s.py:1) 10\n'
        'process 7:"serve";process 8:"VLLM::EngineCore";acquire_read (q.py:1);sched_yield (u.py:1) 20\n'
        'process 7:"serve";process 8:"VLLM::EngineCore";acquire_read (q.py:1);SpinCondition.wait (q.py:2) 10\n'
        "garbage line\n"
    )
    samples = pr.tally_by_process(raw)
    assert samples == {7: {"api_http_json": 30, "event_loop_wait": 70}, 8: {"engine_scheduling": 10, "busy_poll": 30}}
    assert pr.tally(raw) == {"api_http_json": 30, "event_loop_wait": 70, "engine_scheduling": 10, "busy_poll": 30}
    # sample counts dropped unevenly do not matter: the kernel's CPU seconds are split by proportion;
    # a process with CPU but no sample of it is not dropped
    split = pr.cpu_by_stage(samples, {7: 0.6, 8: 2.0, 9: 5.0})
    assert split == pytest.approx({"api_http_json": 0.6, "engine_scheduling": 0.5, "busy_poll": 1.5, "unsampled": 5.0})
