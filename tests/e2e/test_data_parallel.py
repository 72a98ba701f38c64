"""Sessions over two data-parallel ranks (``--data-parallel-size 2``, one API server), on a server
of their own: two engine cores, each bound to one core of this 2-core machine (``0|1``).

* 8 sessions are spread over both ranks (placement: fewest pinned blocks, then fewest sessions);
  every follow-up reuses the session's KV (``recomputed_tokens == 0``) and every generated token
  equals a stateless reference (stock vLLM, prefix caching off).
* Each rank pins exactly its own sessions' blocks (integrity per rank); DELETE frees blocks on the
  session's rank only; with every session closed no rank pins anything.
* Moving a session to the other rank keeps its tokens; its next request rebuilds the KV there.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

from tests.e2e.conftest import Server, free_port, served

pytestmark = pytest.mark.e2e

SESSIONS = 8
PROMPT = 90
TURN_IN = 7
TURN_OUT = 4


@pytest.fixture(scope="module")
def dp_server(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    port = free_port()
    plugin = {"debug_routes": True, "state_dir": str(tmp / "state")}
    cmd = [
        sys.executable, "-m", "vllm_stateful.cli", "serve", tiny_model_path, "--host", "127.0.0.1",
        "--port", str(port), "--served-model-name", "tiny", "--dtype", "float32", "--seed", "0",
        "--max-model-len", "1024", "--block-size", "32", "--num-gpu-blocks-override", "160",
        "--data-parallel-size", "2", "--additional-config", json.dumps({"stateful": plugin}),
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONUNBUFFERED="1")
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # the CLI binds one core per rank
    with served(cmd, env, port, tmp / "server.log", tiny_model_path) as server:
        yield server


def _turn(server: Server, sid: str, prompt: list[int]) -> dict:
    r = server.complete(sid, prompt, max_tokens=TURN_OUT)
    assert r.status_code == 200, r.text
    body = r.json()
    return {"ids": body["choices"][0]["token_ids"], **body["session"]}


def _ranks(server: Server) -> list[dict]:
    return server.idle()["ranks"]


def test_sessions_spread_over_ranks_reuse_their_kv_and_equal_stateless(dp_server, reference):
    server = dp_server
    baseline = _ranks(server)
    assert [r["rank"] for r in baseline] == [0, 1] and all(r["pinned_blocks"] == 0 for r in baseline)
    rng = random.Random(7)
    history: dict[str, list[int]] = {}
    for i in range(SESSIONS):
        sid = f"dp-{i}"
        prompt = [rng.randrange(10, 3000) for _ in range(PROMPT)]
        out = _turn(server, sid, prompt)
        assert out["recomputed_tokens"] == 0
        history[sid] = prompt + out["ids"]
    placed = {sid: server.session(sid)["data_parallel_rank"] for sid in history}
    assert sorted(placed.values()) == [0] * 4 + [1] * 4, placed  # fewest sessions first on a tie

    for _ in range(2):
        for sid in history:
            new = [rng.randrange(10, 3000) for _ in range(TURN_IN)]
            out = _turn(server, sid, new)
            assert out["recomputed_tokens"] == 0, (sid, out)  # served on the rank that holds its KV
            assert out["new_tokens"] == TURN_IN + 1  # and the last generated token, never computed
            expected = reference.greedy(history[sid] + new, TURN_OUT)
            assert out["ids"] == expected, sid
            history[sid] += new + out["ids"]
    for sid, tokens in history.items():
        assert server.session(sid, tokens=True)["token_ids"] == tokens

    ranks = _ranks(server)  # the integrity check (no problems) also compares each pin with its rank
    for r in ranks:
        mine = sorted(sid for sid, rank in placed.items() if rank == r["rank"])
        assert r["sessions"] == mine
        assert r["pinned_blocks"] == sum(server.session(s)["pinned_blocks"] for s in mine) > 0
    metrics = server.get("/metrics").text
    assert 'vllm_stateful:rank_sessions{rank="1"} 4.0' in metrics

    # DELETE frees blocks on the session's own rank
    victim = "dp-3"
    rank = placed[victim]
    before = _ranks(server)
    r = server.delete(f"/v1/sessions/{victim}")
    assert r.status_code == 200 and r.json()["freed_blocks"] > 0
    after = _ranks(server)
    assert after[rank]["pinned_blocks"] == before[rank]["pinned_blocks"] - r.json()["freed_blocks"]
    assert after[1 - rank]["pinned_blocks"] == before[1 - rank]["pinned_blocks"]
    del history[victim]

    # moving a session rebuilds its KV on the other rank, tokens intact
    mover = next(sid for sid in history if placed[sid] == 0)
    moved = server.post(f"/v1/sessions/{mover}/move", json={"data_parallel_rank": 1})
    assert moved.status_code == 200, moved.text
    assert moved.json()["data_parallel_rank"] == 1 and moved.json()["state"] == "cold"
    new = [rng.randrange(10, 3000) for _ in range(TURN_IN)]
    out = _turn(server, mover, new)
    # rebuilt on rank 1, reported: all it had computed (not its last generated token, never computed)
    assert out["recomputed_tokens"] == len(history[mover]) - 1
    assert out["ids"] == reference.greedy(history[mover] + new, TURN_OUT)
    history[mover] += new + out["ids"]
    out = _turn(server, mover, [11, 12, 13])
    assert out["recomputed_tokens"] == 0
    history[mover] += [11, 12, 13] + out["ids"]
    assert server.session(mover, tokens=True)["token_ids"] == history[mover]
    ranks = _ranks(server)
    assert mover in ranks[1]["sessions"] and mover not in ranks[0]["sessions"]
    bad = server.post(f"/v1/sessions/{mover}/move", json={"data_parallel_rank": 2})
    assert bad.status_code == 400, bad.text

    for sid in history:
        assert server.delete(f"/v1/sessions/{sid}").status_code == 200
    for before_rank, r in zip(baseline, _ranks(server)):
        assert r["pinned_blocks"] == 0 and r["charged_blocks"] == 0 and r["sessions"] == []
        assert r["free_blocks"] == before_rank["free_blocks"]  # nothing leaked on any rank
