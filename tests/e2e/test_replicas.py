"""Two replicas behind vllm-router (``--policy consistent_hash`` on ``X-Session-ID``), each with its
own state dir under one shared root (``--shared-state-root``), on servers of their own.

* 8 sessions through the router: each session's requests all land on one replica (every
  follow-up has ``recomputed_tokens == 0``; each replica lists only its own sessions), and every
  generated token equals a stateless reference (stock vLLM, prefix caching off).
* kill -9 one replica: the router moves its sessions to the other, which takes each over from the
  dead replica's state dir with its whole history (``restored.from == "replica"``); the first turn
  there recomputes exactly the history (reported), the next ones nothing.
* the replica comes back on the same state dir: the router sends its sessions back, and it pulls
  each from the live replica (export, import, conditional delete), history intact.
* at the end both replicas hold nothing and pin no block.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port, launch, stop_group, wait_ready, wait_until

pytestmark = pytest.mark.e2e

SESSIONS = 8
PROMPT = 60
TURN_IN = 5
TURN_OUT = 4
HEADER = "X-Session-ID"


class Replica:
    def __init__(self, name: str, model_path: str, root: Path, logs: Path) -> None:
        self.name = name
        self.model_path = model_path
        self.state_dir = root / name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        self.proc = None

    def launch(self) -> None:
        plugin = {
            "debug_routes": True,
            "state_dir": str(self.state_dir),
            "shared_state_root": str(self.state_dir.parent),
        }
        cmd = [
            sys.executable, "-m", "vllm_stateful.cli", "serve", self.model_path, "--host", "127.0.0.1",
            "--port", str(self.port), "--served-model-name", "tiny", "--dtype", "float32", "--seed", "0",
            "--max-model-len", "1024", "--block-size", "32", "--num-gpu-blocks-override", "160",
            "--session-header", HEADER, "--additional-config", json.dumps({"stateful": plugin}),
        ]  # fmt: skip
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONUNBUFFERED="1")
        self.proc = launch(cmd, env, self.log)

    def ready(self) -> None:
        wait_ready(self.proc, self.url, self.log)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def sessions(self) -> dict[str, dict]:
        r = httpx.get(self.url + "/v1/sessions", timeout=30)
        assert r.status_code == 200, r.text
        return {s["id"]: s for s in r.json()["data"]}

    def integrity(self) -> dict:
        body = httpx.get(self.url + "/v1/stateful/debug/integrity", timeout=30).json()
        assert body["problems"] == [], body
        return body


@pytest.fixture(scope="module")
def cluster(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    root = tmp / "shared"
    root.mkdir()
    replicas = [Replica(name, tiny_model_path, root, tmp) for name in ("replica-a", "replica-b")]
    router_bin = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    port = free_port()
    router_cmd = [
        router_bin, "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
        "--worker-urls", *(r.url for r in replicas), "--policy", "consistent_hash",
        "--health-check-interval-secs", "1", "--health-failure-threshold", "1", "--health-success-threshold", "1",
        "--health-check-timeout-secs", "5", "--worker-startup-check-interval", "1", "--disable-circuit-breaker",
        "--log-level", "error",
    ]  # fmt: skip
    router = None
    try:
        for r in replicas:
            r.launch()
        for r in replicas:
            r.ready()
        router = launch(router_cmd, dict(os.environ), tmp / "router.log")
        router_url = f"http://127.0.0.1:{port}"
        # the router's own readiness waits for every worker's /health; a loaded CI machine can take
        # minutes, and a router that exits (a taken port) fails at once with its log
        wait_ready(router, router_url, tmp / "router.log", timeout_s=300)
        yield router_url, replicas
    finally:
        if router is not None:
            stop_group(router)
        for r in replicas:
            if r.proc is not None:
                stop_group(r.proc)


def _turn(router: str, sid: str, prompt: list[int], retry_s: float = 0) -> dict:
    """A greedy turn on session ``sid`` through the router (named by the header it hashes only);
    ``retry_s``: retry 5xx answers that long (the router has not noticed a dead replica yet)."""
    deadline = time.time() + retry_s
    while True:
        r = httpx.post(
            router + "/v1/completions",
            headers={HEADER: sid},
            json={
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": TURN_OUT,
                "temperature": 0,
                "return_token_ids": True,
            },
            timeout=120,
        )
        if r.status_code < 500 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session"]["id"] == sid
    return {"ids": body["choices"][0]["token_ids"], **body["session"]}


def test_sessions_stick_to_a_replica_and_survive_its_loss_and_return(cluster, reference):
    router, (a, b) = cluster
    rng = random.Random(11)
    history: dict[str, list[int]] = {}

    def follow_up(sid: str, retry_s: float = 0) -> dict:
        new = [rng.randrange(10, 3000) for _ in range(TURN_IN)]
        out = _turn(router, sid, new, retry_s)
        assert out["ids"] == reference.greedy(history[sid] + new, TURN_OUT), sid
        history[sid] += new + out["ids"]
        return out

    for i in range(SESSIONS):
        sid = f"rep-{i}"
        prompt = [rng.randrange(10, 3000) for _ in range(PROMPT)]
        out = _turn(router, sid, prompt)
        assert out["ids"] == reference.greedy(prompt, TURN_OUT)
        history[sid] = prompt + out["ids"]
    for _ in range(2):
        for sid in history:
            assert follow_up(sid)["recomputed_tokens"] == 0, sid  # always the replica that holds it
    on_a, on_b = set(a.sessions()), set(b.sessions())
    assert on_a | on_b == set(history) and not on_a & on_b
    assert on_a and on_b, (on_a, on_b)  # the ring spreads these 8 ids over both

    # replica B dies: its sessions continue on A, taken over from B's state dir
    b.kill9()
    for sid in sorted(on_b):
        out = follow_up(sid, retry_s=30)
        # the whole history re-prefilled there (restored sessions count every token)
        assert out["recomputed_tokens"] == len(history[sid]) - TURN_IN - TURN_OUT, (sid, out)
        assert out["version"] == 4
    for sid in history:
        assert follow_up(sid)["recomputed_tokens"] == 0, sid
    held = a.sessions()
    assert set(held) == set(history)
    assert all(held[sid]["restored"]["from"] == "replica" for sid in on_b)
    for sid, tokens in history.items():
        r = httpx.get(f"{a.url}/v1/sessions/{sid}", params={"include_tokens": "true"}, timeout=30)
        assert r.json()["token_ids"] == tokens, sid

    # B comes back on its state dir: the router sends its sessions back and B pulls them from A
    b.launch()
    b.ready()
    assert b.sessions() == {}  # A took them all from its store
    wait_until(lambda: _healthy(router) == 2, timeout_s=120, what="router sends B's keys back")
    for sid in sorted(on_b):
        out = follow_up(sid, retry_s=10)
        assert out["recomputed_tokens"] == len(history[sid]) - TURN_IN - TURN_OUT, (sid, out)
    for sid in history:
        assert follow_up(sid)["recomputed_tokens"] == 0, sid
    assert set(b.sessions()) == on_b and set(a.sessions()) == on_a

    for sid in history:
        r = httpx.delete(f"{router}/v1/sessions/{sid}", headers={HEADER: sid}, timeout=30)
        assert r.status_code == 200, r.text
    for replica in (a, b):
        assert replica.sessions() == {}
        assert replica.integrity()["pinned_blocks"] == 0


def _healthy(router: str) -> int:
    """Replicas the router routes to now."""
    try:
        workers = httpx.get(f"{router}/workers", timeout=10).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return 0
    return sum(1 for w in workers if w.get("is_healthy"))
