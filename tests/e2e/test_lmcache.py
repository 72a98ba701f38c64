"""Optional: with LMCache's multi-process server and a disk tier, a session restored after a kill -9
loads its full blocks instead of recomputing them. Skipped unless the ``lmcache`` extra is installed
(``pip install 'vllm-stateful[lmcache]'``); docs/lifecycle.md has the recipe."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.conftest import Server, free_port, launch, stop_group, wait_ready, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("lmcache") is None,
        reason="the optional lmcache extra is not installed (pip install 'vllm-stateful[lmcache]')",
    ),
]

CHUNK = 32


@pytest.fixture
def lmcache_server(tmp_path):
    disk = tmp_path / "lmcache"
    disk.mkdir()
    cmd = [
        sys.executable, "-m", "lmcache.v1.multiprocess.server", "--chunk-size", str(CHUNK),
        "--supported-transfer-mode", "auto", "--l2-adapter", json.dumps({"type": "fs", "base_path": str(disk)}),
    ]  # fmt: skip
    log = tmp_path / "lmcache.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    yield proc
    stop_group(proc)


def _start(model_path: str, state_dir: str, log) -> tuple[subprocess.Popen, Server]:
    port = free_port()
    plugin = {"state_dir": state_dir, "debug_routes": True}
    cmd = [
        sys.executable, "-m", "vllm_stateful.cli", "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny", "--dtype", "float32", "--seed", "0", "--max-model-len", "2048",
        "--block-size", str(CHUNK), "--kv-offloading-backend", "lmcache", "--kv-offloading-size", "1",
        "--additional-config", json.dumps({"stateful": plugin}),
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = launch(cmd, env, log)
    root = f"http://127.0.0.1:{port}"
    wait_ready(proc, root, log, timeout_s=600)
    return proc, Server(root + "/v1", root, "tiny", model_path, log)


def test_restored_session_loads_its_blocks_from_the_disk_tier(lmcache_server, tiny_model_path, tmp_path, reference):
    state_dir = str(tmp_path / "state")
    proc, server = _start(tiny_model_path, state_dir, tmp_path / "server.log")
    try:
        prompt = server.fresh_session("lm", 300, seed=3)
        history = prompt + [5, 6] + server.complete("lm", [5, 6], 4).json()["choices"][0]["token_ids"]
        wait_until(lambda: True)  # writes through to LMCache happen as blocks are computed
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    proc, server = _start(tiny_model_path, state_dir, tmp_path / "server.log")
    try:
        assert server.session("lm")["state"] == "cold"
        body = server.complete("lm", [7], 4).json()
        assert body["choices"][0]["token_ids"] == reference.greedy(history + [7], 4)
        # every full block came from the disk tier: at most the partial last block is recomputed
        assert body["session"]["recomputed_tokens"] <= CHUNK, body["session"]
        assert server.session("lm")["restored"]["kv"] in ("loaded", "recomputed")
    finally:
        stop_group(proc)
