"""A vLLM engine with our scheduler class, in a process of its own, stepped one step at a time: the
harness of the e2e tests that inspect the scheduler between steps (``kv_pressure_driver.py``,
``ingest_step_driver.py``).

Its own process because a second in-process engine in the test process tears down vLLM's
process-wide parallel state when it goes, under the shared reference engine. A driver module runs as
``python -m tests.e2e.<driver> MODEL_DIR`` from the repository root and prints one ``REPORT`` line of
JSON (``print_report``); the test reads it back with ``run_driver``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32
PREFIX = "REPORT "


def stepped_llm(model_dir: str, stateful: dict[str, Any], **engine_args: Any) -> Any:
    """An in-process ``vllm.LLM`` (tiny model, float32, eager, seed 0, block size ``BLOCK``) with
    ``StatefulScheduler`` and ``{"stateful": stateful}`` as its additional config."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: stepped and inspected here
    from vllm import LLM

    return LLM(
        model_dir,
        block_size=BLOCK,
        enforce_eager=True,
        seed=0,
        dtype="float32",
        scheduler_cls="vllm_stateful.engine.scheduler.StatefulScheduler",
        additional_config={"stateful": stateful},
        **engine_args,
    )


def computed(scheduler: Any, request_id: str) -> int:
    """Tokens computed for the engine request made from ``request_id`` (vLLM adds a suffix to it);
    0 once it is gone."""
    found = [r for rid, r in scheduler.requests.items() if rid == request_id or rid.startswith(request_id + "-")]
    assert len(found) <= 1, found
    return found[0].num_computed_tokens if found else 0


def print_report(report: dict[str, Any]) -> None:
    print(PREFIX + json.dumps(report), flush=True)


def run_driver(module: str, model_dir: str) -> dict[str, Any]:
    """Run ``tests.e2e.<module>`` on ``model_dir`` in a process of its own; its report."""
    done = subprocess.run(
        [sys.executable, "-m", f"tests.e2e.{module}", model_dir],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(PREFIX)]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len(PREFIX) :])
