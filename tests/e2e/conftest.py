"""One vllm-stateful server per test run, on the tiny demo model (real vLLM),
plus one independent reference engine: a stock in-process vLLM engine with
prefix caching off, so equality checks never read the server's cached blocks.

The server runs the demanding configuration: two API keys (two tenants),
vLLM's dev routes (cache reset, pause, collective_rpc), the plugin's debug
route, a custom chat template (ChatML plus one rule that raises), and a
small KV pool so that bursts preempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

AUTH_A = {"Authorization": "Bearer test-key-tenant-a"}
MAX_MODEL_LEN = 2048
SESSION_QUOTA = 1536
INGEST_QUEUE_TOKENS = 512
# A small KV pool (block size 32) so that a burst of stateless requests forces vLLM to preempt.
NUM_KV_BLOCKS = 640
BLOCK_SIZE = 32
KEY_A = "test-key-tenant-a"
KEY_B = "test-key-tenant-b"
MAX_BODY_BYTES = 256 * 1024
MAX_SESSIONS_PER_TENANT = 200
MAX_SUBSCRIBERS = 4
EVENT_BUFFER = 8
EVENT_REPLAY = 16
MAX_FLASH_PER_SESSION = 4
# Prefill chunks of 256 tokens (vLLM's step budget), so long prompts take several steps, and
# ingestion's share next to foreground steps.
CHUNK_TOKENS = 256
INGEST_SHARE = 32
INGEST_YIELD = 4  # steps ingestion may yield to running queries before a share step
CHAT_TEMPLATE = Path(__file__).with_name("strict_chatml.jinja")


@dataclass(frozen=True)
class Server:
    base_url: str  # ends with /v1
    root: str
    model: str
    model_path: str
    log: Path
    api_key: str = KEY_A
    headers: dict = field(default_factory=dict)

    def _headers(self, kw: dict) -> dict:
        return {"Authorization": f"Bearer {self.api_key}", **self.headers, **kw.pop("headers", {})}

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.root + path, timeout=kw.pop("timeout", 60), headers=self._headers(kw), **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.root + path, timeout=kw.pop("timeout", 120), headers=self._headers(kw), **kw)

    def delete(self, path: str, **kw) -> httpx.Response:
        return httpx.delete(self.root + path, timeout=kw.pop("timeout", 60), headers=self._headers(kw), **kw)

    def as_tenant(self, api_key: str) -> "Server":
        return Server(self.base_url, self.root, self.model, self.model_path, self.log, api_key)

    def integrity(self) -> dict:
        body = self.get("/v1/stateful/debug/integrity").json()
        assert body["problems"] == [], body
        return body

    def fresh_session(self, sid: str, n_tokens: int, seed: int = 0) -> list[int]:
        """Create session ``sid`` holding ``n_tokens`` seeded random token ids; returns them."""
        import random

        rng = random.Random(seed)
        prompt = [rng.randrange(10, 3000) for _ in range(n_tokens)]
        r = self.post("/v1/sessions", json={"id": sid, "prompt": prompt})
        assert r.status_code == 201, r.text
        return prompt

    def complete(self, sid: str, prompt, max_tokens: int = 3, commit: bool = True, **fields) -> httpx.Response:
        """A greedy completions request on session ``sid``, with the generated token ids (``fields``:
        more body fields, e.g. ``consistency``)."""
        return self.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stateful": sid,
                  "stateful_commit": commit, "return_token_ids": True, **fields},
        )  # fmt: skip

    @contextlib.contextmanager
    def held_request(self, path: str, body: dict):
        """Send ``body`` to ``path`` while vLLM is paused and keep it admitted but not running until
        the block ends: a committing turn then holds its session (whatever the machine's speed), so
        work sent meanwhile queues behind it. Yields a future of the response."""
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            with self.paused():
                future = pool.submit(self.post, path, json=body)
                wait_until(lambda: (b := self.integrity())["waiting"] + b["running"] > 0, what="request admitted")
                yield future
            future.result()
        finally:
            pool.shutdown(wait=True)

    @contextlib.contextmanager
    def paused(self):
        """vLLM's engine frozen (``/pause?mode=keep``, a dev route): running requests stay where they
        are, so work queued behind them meanwhile stays queued, however fast the machine is."""
        r = httpx.post(self.root + "/pause", params={"mode": "keep", "clear_cache": "false"}, timeout=60)
        assert r.status_code == 200, r.text
        try:
            yield
        finally:
            assert httpx.post(self.root + "/resume", timeout=60).status_code == 200

    def idle(self) -> dict:
        """The integrity report once nothing runs or waits in the engine."""
        return wait_until(lambda: (b := self.integrity())["running"] == 0 and b["waiting"] == 0 and b, what="idle")

    def session(self, sid: str, tokens: bool = False) -> dict:
        r = self.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"} if tokens else None)
        assert r.status_code == 200, r.text
        return r.json()

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all label sets)."""
        import re

        text = self.get("/metrics").text
        pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$"
        return sum(float(v) for v in re.findall(pattern, text, re.M))


def wait_until(predicate, timeout_s: float = 30, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy, which is returned."""
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    """The response is an OpenAI-style error with this status and code; returns the error object."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"] and err["type"], err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from vllm_stateful.demo_model import build_demo_model

    return str(build_demo_model(tmp_path_factory.mktemp("model") / "tiny", "tiny"))


@pytest.fixture(scope="session")
def stateful_server(tiny_model_path, tmp_path_factory) -> Server:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONUNBUFFERED="1",
        VLLM_SERVER_DEV_MODE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="1",  # the reference engine sets 0 in this process
    )
    plugin = {
        "debug_routes": True,
        "max_request_body_bytes": MAX_BODY_BYTES,
        "max_sessions_per_tenant": MAX_SESSIONS_PER_TENANT,
        "ingest_wait_timeout_s": 60,
        "max_event_subscribers_per_session": MAX_SUBSCRIBERS,
        "event_buffer": EVENT_BUFFER,
        "event_replay": EVENT_REPLAY,
        "max_flash_queries_per_session": MAX_FLASH_PER_SESSION,
        "ingest_share_tokens": INGEST_SHARE,
        "ingest_yield_steps": INGEST_YIELD,
        # every commit of every test is written to SQLite (durability on, as by default)
        "state_dir": str(tmp_path_factory.mktemp("state")),
    }
    cmd = [
        sys.executable, "-m", "vllm_stateful.cli", "serve", tiny_model_path,
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny",
        "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--seed", "0",
        "--session-quota", str(SESSION_QUOTA),
        "--max-ingest-queue-tokens", str(INGEST_QUEUE_TOKENS),
        "--num-gpu-blocks-override", str(NUM_KV_BLOCKS),
        "--block-size", str(BLOCK_SIZE),
        "--max-num-batched-tokens", str(CHUNK_TOKENS),
        "--api-key", KEY_A, KEY_B,
        "--enable-prompt-tokens-details",
        "--chat-template", str(CHAT_TEMPLATE),
        "--additional-config", json.dumps({"stateful": plugin}),
    ]  # fmt: skip
    with served(cmd, env, port, log, tiny_model_path) as server:
        yield server


@contextlib.contextmanager
def served(cmd: list[str], env: dict, port: int, log: Path, model_path: str):
    """A server started from ``cmd`` on ``port`` for the block, once it answers; stopped after."""
    proc = launch(cmd, env, log)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, root, log)
        yield Server(root + "/v1", root, "tiny", model_path, log)
    finally:
        stop_group(proc)


def launch(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start a server in its own process group (so stopping it stops the engine and workers)."""
    with open(log, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, root: str, log: Path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(root + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"server not ready:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def stop_group(proc: subprocess.Popen) -> None:
    import signal

    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            os.killpg(proc.pid, signal.SIGKILL)  # anything left of the group (engine, workers)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        return


@pytest.fixture(scope="session")
def client(stateful_server):
    from openai import OpenAI

    return OpenAI(base_url=stateful_server.base_url, api_key=KEY_A, timeout=120, max_retries=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


class Reference:
    """Greedy answers of a stock vLLM engine (stock scheduler, prefix caching off):
    independent of the server under test and of anything it cached."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def greedy(self, prompt_ids: list[int], max_tokens: int, **params) -> list[int]:
        return self.greedy_many([prompt_ids], max_tokens, **params)[0]

    def greedy_many(self, prompts: list[list[int]], max_tokens: int, **params) -> list[list[int]]:
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0, **params)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def greedy_mismatches(self, history: list[int], generated_positions: list[int]) -> list[int]:
        """Positions in ``history`` (generated by the session) where the reference's
        greedy choice, given everything before it, differs: empty when they agree."""
        from vllm import SamplingParams

        if not generated_positions:
            return []
        out = self.llm.generate(
            [{"prompt_token_ids": history}], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False
        )[0]
        bad = []
        for pos in generated_positions:
            ranks = out.prompt_logprobs[pos]
            if ranks[history[pos]].rank != 1:
                bad.append(pos)
        return bad


@pytest.fixture(scope="session")
def reference(tiny_model_path) -> Reference:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process, so tests can inspect it
    from vllm import LLM

    llm = LLM(
        tiny_model_path,
        block_size=BLOCK_SIZE,
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        seed=0,
        dtype="float32",
        enable_prefix_caching=False,
    )
    yield Reference(llm)
    del llm
