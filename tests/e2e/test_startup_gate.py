"""Setups sessions cannot serve are refused at startup with a message that
says what is supported (issue #8, item 8). Each case starts a real server
process, which must exit instead of serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

SUPPORTED = "vllm-stateful supports full-attention models with one KV cache group"


def _serve(model: str, *flags: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    cmd = [sys.executable, "-m", "vllm_stateful.cli", "serve", model, "--port", "0", "--dtype", "float32", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_sliding_window_model_is_refused(tiny_model_path, tmp_path):
    model = tmp_path / "tiny-sliding"
    shutil.copytree(tiny_model_path, model)
    config = json.loads((model / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=64, max_window_layers=0)
    config.pop("layer_types", None)
    (model / "config.json").write_text(json.dumps(config))
    done = _serve(str(model), "--max-model-len", "512")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert SUPPORTED in output and "sliding-window" in output, output[-3000:]


def test_several_api_servers_are_refused_before_starting(tiny_model_path):
    # several data-parallel ranks are served (tests/e2e/test_data_parallel.py); several API servers are not
    for flags in (["--api-server-count", "2"], ["--data-parallel-size", "2", "--api-server-count", "2"]):
        done = _serve(tiny_model_path, *flags, timeout_s=60)
        assert done.returncode != 0 and "(--api-server-count 1)" in done.stderr, done.stderr[-2000:]
