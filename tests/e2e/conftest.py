"""One vllm-stateful server per test run, on the tiny demo model (real vLLM)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MAX_MODEL_LEN = 2048
SESSION_QUOTA = 1536
INGEST_QUEUE_TOKENS = 512
# A small KV pool (block size 32) so that a burst of stateless requests forces vLLM to preempt.
NUM_KV_BLOCKS = 640


@dataclass(frozen=True)
class Server:
    base_url: str  # ends with /v1
    root: str
    model: str
    model_path: str
    log: Path

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.root + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.root + path, timeout=120, **kw)

    def delete(self, path: str, **kw) -> httpx.Response:
        return httpx.delete(self.root + path, timeout=60, **kw)

    def integrity(self) -> dict:
        body = self.get("/v1/stateful/debug/integrity").json()
        assert body["problems"] == [], body
        return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from vllm_stateful.demo_model import build_demo_model

    return str(build_demo_model(tmp_path_factory.mktemp("model") / "tiny", "tiny"))


@pytest.fixture(scope="session")
def stateful_server(tiny_model_path, tmp_path_factory) -> Server:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "vllm_stateful.cli",
        "serve",
        tiny_model_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--seed",
        "0",
        "--session-quota",
        str(SESSION_QUOTA),
        "--max-ingest-queue-tokens",
        str(INGEST_QUEUE_TOKENS),
        "--num-gpu-blocks-override",
        str(NUM_KV_BLOCKS),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(root + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server not ready:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield Server(root + "/v1", root, "tiny", tiny_model_path, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def client(stateful_server):
    from openai import OpenAI

    return OpenAI(base_url=stateful_server.base_url, api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)
