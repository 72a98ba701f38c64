"""Durable sessions and spill instead of reject, on a real server of their own
(they restart it, so they cannot share the run's server).

* ``admission: "offload"`` on a small KV pool: 4x more sessions than fit are
  created without a 429, each resumes equal to a stateless reference, and
  ``recomputed_tokens`` says what each restore recomputed.
* kill -9 under load at random points, restarted on the same ``state_dir``:
  every acknowledged change is there, nothing unacknowledged is half-applied,
  and each session's next turn equals the reference.
* ``restore: eager`` rebuilds the restored sessions' KV in the background.

``KILL_ROUNDS`` (env) sets the kill points (default 2); each round prints what
was acknowledged and what came back.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import Server, free_port, launch, stop_group, wait_ready, wait_until

pytestmark = pytest.mark.e2e

BLOCK = 32
MAX_LEN = 1024
KV_BLOCKS = 72  # budget: 71 usable - 32 headroom = 39 blocks
PROMPT = 200
TURN_OUT = 4


class Restartable:
    def __init__(self, model_path: str, tmp) -> None:
        self.model_path = model_path
        self.state_dir = str(tmp / "state")
        self.log = tmp / "server.log"
        self.proc = None
        self.server: Server | None = None

    def start(self, restore: str = "lazy") -> Server:
        port = free_port()
        plugin = {"state_dir": self.state_dir, "admission": "offload", "debug_routes": True, "restore": restore}
        cmd = [
            sys.executable, "-m", "vllm_stateful.cli", "serve", self.model_path, "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", "tiny", "--dtype", "float32", "--seed", "0",
            "--max-model-len", str(MAX_LEN), "--block-size", str(BLOCK), "--num-gpu-blocks-override", str(KV_BLOCKS),
            "--max-num-batched-tokens", "256", "--additional-config", json.dumps({"stateful": plugin}),
        ]  # fmt: skip
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONUNBUFFERED="1")
        self.proc = launch(cmd, env, self.log)
        root = f"http://127.0.0.1:{port}"
        wait_ready(self.proc, root, self.log)
        self.server = Server(root + "/v1", root, "tiny", self.model_path, self.log)
        return self.server

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the API server, the engine core, everything
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


@pytest.fixture(scope="module")
def durable(tiny_model_path, tmp_path_factory):
    node = Restartable(tiny_model_path, tmp_path_factory.mktemp("durable"))
    node.start()
    yield node
    node.stop()


def _turn(server: Server, sid: str, prompt: list[int], max_tokens: int = TURN_OUT) -> dict:
    r = server.complete(sid, prompt, max_tokens)
    assert r.status_code == 200, r.text
    return r.json()


def _delete_all(server: Server) -> None:
    for s in server.get("/v1/sessions").json()["data"]:
        assert server.delete(f"/v1/sessions/{s['id']}").status_code == 200


def test_offload_admits_4x_the_sessions_that_fit_and_each_resumes_as_the_reference(durable, reference):
    server = durable.server
    budget = server.integrity()["budget_blocks"]
    per_session = -(-(PROMPT + 3 + TURN_OUT) // BLOCK)
    fit = budget // per_session
    n = 4 * fit
    histories = {}
    for i in range(n):
        sid = f"off-{i}"
        prompt = server.fresh_session(sid, PROMPT, seed=100 + i)  # never a 429: idle sessions leave instead
        out = _turn(server, sid, [5, 6, 7])["choices"][0]["token_ids"]
        histories[sid] = prompt + [5, 6, 7] + out
    states = {s["id"]: s for s in server.get("/v1/sessions").json()["data"]}
    spilled = [sid for sid, s in states.items() if s["state"] == "cold"]
    assert len(spilled) >= n - fit, {k: v["state"] for k, v in states.items()}
    assert all(states[sid]["pinned_blocks"] == 0 for sid in spilled)
    assert server.integrity()["charged_blocks"] <= budget

    report = []
    for i in reversed(range(n)):  # the most recently used (still resident) first
        sid = f"off-{i}"
        state_before = server.session(sid)["state"]
        body = _turn(server, sid, [8, 9])
        got, meta = body["choices"][0]["token_ids"], body["session"]
        assert got == reference.greedy(histories[sid] + [8, 9], TURN_OUT), sid
        report.append((sid, state_before, meta["recomputed_tokens"], len(histories[sid])))
        if state_before == "resident":
            assert meta["recomputed_tokens"] == 0, (sid, meta)
        else:  # cold: what vLLM's prefix cache no longer held, at most the whole history
            assert 0 <= meta["recomputed_tokens"] <= len(histories[sid]), (sid, meta)
    cold = [r for r in report if r[1] == "cold"]
    print(f"\noffload: {n} sessions over a budget of {budget} blocks ({fit} fit); restores:")
    for state in ("resident", "cold"):
        rows = [r[2] for r in report if r[1] == state]
        if rows:
            print(f"  {state}: {len(rows)} restores, recomputed_tokens min/max {min(rows)}/{max(rows)}")
    assert cold and sum(r[2] for r in cold) > 0  # spilled KV really left the pool
    server.integrity()
    _delete_all(server)
    end = server.idle()
    assert end["pinned_blocks"] == 0 and end["charged_blocks"] == 0


class Driver:
    """One client thread per session, one change in flight at a time: appends (token ids) and
    turns (greedy completions), each logged once acknowledged."""

    def __init__(self, server: Server, sid: str, seed: int) -> None:
        self.server, self.sid, self.rng = server, sid, random.Random(seed)
        self.acked: list[tuple[str, list[int], list[int]]] = []  # (kind, input ids, generated ids)
        self.in_flight: tuple[str, list[int]] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        grown = 0  # each session stays well inside the context, so its next turn after the restart fits
        while not self.stop.is_set() and grown < MAX_LEN // 2:
            ids = [self.rng.randrange(10, 3000) for _ in range(self.rng.randint(3, 40))]
            kind = "append" if self.rng.random() < 0.5 else "turn"
            grown += len(ids) + (TURN_OUT if kind == "turn" else 0)
            self.in_flight = (kind, ids)
            try:
                if kind == "append":
                    r = httpx.post(
                        f"{self.server.base_url}/sessions/{self.sid}/append", json={"token_ids": ids}, timeout=60
                    )
                    assert r.status_code == 202, r.text
                    self.acked.append((kind, ids, []))
                else:
                    r = self.server.complete(self.sid, ids, TURN_OUT)
                    assert r.status_code == 200, r.text
                    self.acked.append((kind, ids, r.json()["choices"][0]["token_ids"]))
                self.in_flight = None
            except (httpx.HTTPError, AssertionError):
                return  # the server died under this request: it stays in flight


def _check_restored(server: Server, reference, sid: str, base: list[int], d: Driver) -> tuple[int, bool]:
    """The restored session holds every acknowledged change, and the one in flight wholly or not
    at all; returns (acknowledged versions, whether the in-flight change is there)."""
    wait_until(lambda: server.session(sid)["queued_tokens"] == 0, 120, "restored appends ingested")
    s = server.session(sid, tokens=True)
    acked_version = 1 + len(d.acked)
    expected = list(base)
    for _, ids, out in d.acked:
        expected += ids + out
    tokens = s["token_ids"]
    assert tokens[: len(expected)] == expected, f"{sid}: an acknowledged change is missing or altered"
    rest = tokens[len(expected) :]
    if s["version"] == acked_version:
        assert rest == [], f"{sid}: tokens of an unacknowledged change appear without its version"
        return acked_version, False
    assert s["version"] == acked_version + 1 and d.in_flight is not None, (sid, s["version"], acked_version)
    kind, ids = d.in_flight
    if kind == "append":
        assert rest == ids, f"{sid}: the in-flight append came back partly"
    else:
        assert rest[: len(ids)] == ids and len(rest) == len(ids) + TURN_OUT, f"{sid}: the in-flight turn is partial"
        assert rest[len(ids) :] == reference.greedy(expected + ids, TURN_OUT)
    return acked_version, True


def test_kill9_at_random_points_loses_no_acknowledged_change(durable, reference):
    rounds = int(os.environ.get("KILL_ROUNDS", "2"))
    rng = random.Random(2026)
    _delete_all(durable.server)
    for rnd in range(rounds):
        server = durable.server
        bases = {f"kill{rnd}-{i}": server.fresh_session(f"kill{rnd}-{i}", 40, seed=rnd * 10 + i) for i in range(6)}
        drivers = {sid: Driver(server, sid, rnd * 100 + i) for i, sid in enumerate(bases)}
        threads = [threading.Thread(target=d.run, daemon=True) for d in drivers.values()]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(2.0, 8.0))
        durable.kill9()
        for d in drivers.values():
            d.stop.set()
        for t in threads:
            t.join(timeout=60)
        server = durable.start()
        acked = restored_extra = 0
        for sid, d in drivers.items():
            n, extra = _check_restored(server, reference, sid, bases[sid], d)
            acked += n
            restored_extra += extra
            history = server.session(sid, tokens=True)["token_ids"]
            body = _turn(server, sid, [77, 78])
            assert body["choices"][0]["token_ids"] == reference.greedy(history + [77, 78], TURN_OUT), sid
            assert body["session"]["recomputed_tokens"] <= len(history)
        print(
            f"\nkill point {rnd}: {acked} changes acknowledged over 6 sessions, all restored; "
            f"{restored_extra} in-flight changes were saved whole before the kill, none half-applied"
        )
        server.integrity()
        _delete_all(server)
        end = server.idle()
        assert end["pinned_blocks"] == 0 and end["charged_blocks"] == 0, end
        assert end["free_blocks"] == KV_BLOCKS - 1, end  # every block back (vLLM keeps one null block)


def test_eager_restore_rebuilds_kv_in_the_background(durable, reference):
    server = durable.server
    _delete_all(server)
    histories = {}
    for i in range(2):
        sid = f"eager-{i}"
        prompt = server.fresh_session(sid, 120, seed=500 + i)
        histories[sid] = prompt + [1, 2] + _turn(server, sid, [1, 2])["choices"][0]["token_ids"]
    durable.stop()
    server = durable.start(restore="eager")
    for sid, history in histories.items():
        s = wait_until(lambda sid=sid: (s := server.session(sid))["state"] == "resident" and s, 120, "eager restore")
        assert s["restored"]["kv"] == "recomputed" and s["restored"]["mode"] == "eager"
        body = _turn(server, sid, [3])
        assert body["session"]["recomputed_tokens"] == 0  # rebuilt before the client came back
        assert body["choices"][0]["token_ids"] == reference.greedy(history + [3], TURN_OUT)
    server.integrity()
    _delete_all(server)
