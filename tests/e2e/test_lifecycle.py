"""Fork, rewind, export and import on the real engine (shared server): each
session continues exactly as a stateless reference over its own tokens, a fork
allocates no block, and every block returns when the sessions close."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import KEY_B, assert_error, wait_until

pytestmark = pytest.mark.e2e


def _turn(server, sid: str, prompt: list[int], max_tokens: int = 4) -> tuple[list[int], dict]:
    r = server.complete(sid, prompt, max_tokens)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["token_ids"], body["session"]


def test_fork_shares_every_block_and_both_continue_as_the_reference(stateful_server, reference):
    server = stateful_server
    before = server.idle()
    prompt = server.fresh_session("fork-parent", 150, seed=11)
    out, _ = _turn(server, "fork-parent", [40, 41, 42])
    parent = server.session("fork-parent", tokens=True)
    blocks_before = server.idle()["free_blocks"]
    charged_before = server.integrity()["charged_blocks"]

    r = server.post("/v1/sessions/fork-parent/fork", json={"id": "fork-child"})
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["forked_from"] == "fork-parent" and child["version"] == parent["version"]
    assert child["context_tokens"] == parent["context_tokens"] == len(prompt) + 3 + len(out)
    assert child["pinned_blocks"] == parent["pinned_blocks"] > 0
    after = server.idle()
    assert after["free_blocks"] == blocks_before  # the fork allocated no block
    assert after["charged_blocks"] - charged_before <= 1  # at most its own partial last block
    assert server.session("fork-child", tokens=True)["token_ids"] == parent["token_ids"]

    histories = {}
    for sid, new in (("fork-parent", [7, 8, 9]), ("fork-child", [300, 301])):
        got, meta = _turn(server, sid, new, 5)
        assert meta["recomputed_tokens"] == 0, meta  # the child reads the parent's pinned blocks
        assert got == reference.greedy(parent["token_ids"] + new, 5), sid
        histories[sid] = server.session(sid, tokens=True)["token_ids"]
    assert histories["fork-parent"] != histories["fork-child"]
    # deleting the parent leaves the child whole
    assert server.delete("/v1/sessions/fork-parent").status_code == 200
    got, meta = _turn(server, "fork-child", [5, 6])
    assert meta["recomputed_tokens"] == 0 and got == reference.greedy(histories["fork-child"] + [5, 6], 4)
    assert server.delete("/v1/sessions/fork-child").status_code == 200
    end = server.idle()
    assert end["pinned_blocks"] == before["pinned_blocks"] and end["charged_blocks"] == before["charged_blocks"]


def test_fork_errors(stateful_server):
    server = stateful_server
    server.fresh_session("fork-err", 40, seed=2)
    assert_error(server.post("/v1/sessions/fork-err/fork", json={"id": "fork-err"}), 409, "session_exists")
    assert_error(server.post("/v1/sessions/fork-err/fork", json={"id": "bad id!"}), 400, "invalid_session_id")
    assert_error(server.post("/v1/sessions/fork-err/fork", json={"idx": 1}), 400, "invalid_request")
    assert_error(server.post("/v1/sessions/nope/fork", json={}), 404, "session_not_found")
    other = server.as_tenant(KEY_B)
    assert_error(other.post("/v1/sessions/fork-err/fork", json={}), 404, "session_not_found")
    assert server.delete("/v1/sessions/fork-err").status_code == 200


def test_rewind_returns_to_a_version_and_continues_as_the_reference(stateful_server, reference):
    server = stateful_server
    before = server.idle()
    server.fresh_session("rw", 64, seed=5)
    snapshots = {1: server.session("rw", tokens=True)["token_ids"]}
    for v, new in ((2, [11, 12]), (3, [13, 14, 15])):
        _turn(server, "rw", new)
        snapshots[v] = server.session("rw", tokens=True)["token_ids"]
    r = server.post("/v1/sessions/rw/append", json={"token_ids": [21, 22, 23], "wait": True})
    assert r.status_code == 200 and r.json()["version"] == 4
    fq = server.post("/v1/sessions/rw/flash_queries", json={"prompt": [9], "max_tokens": 2}).json()["id"]
    wait_until(lambda: server.get(f"/v1/sessions/rw/flash_queries/{fq}").json()["version"] == 4, what="flash")

    r = server.post("/v1/sessions/rw/rewind", json={"version": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 2 and body["context_tokens"] == len(snapshots[2])
    assert server.session("rw", tokens=True)["token_ids"] == snapshots[2]
    answer = server.get(f"/v1/sessions/rw/flash_queries/{fq}").json()
    assert answer["version"] is None or answer["version"] <= 2  # the answer at version 4 is gone
    got, meta = _turn(server, "rw", [50, 51], 5)
    assert got == reference.greedy(snapshots[2] + [50, 51], 5)
    assert meta["version"] == 3 and meta["recomputed_tokens"] == 0
    assert_error(server.post("/v1/sessions/rw/rewind", json={"version": 9}), 409, "version_unavailable")
    assert_error(server.post("/v1/sessions/rw/rewind", json={"version": -1}), 400, "invalid_request")
    assert_error(server.as_tenant(KEY_B).post("/v1/sessions/rw/rewind", json={"version": 1}), 404, "session_not_found")
    assert server.post("/v1/sessions/rw/rewind", json={"version": 1}).json()["context_tokens"] == len(snapshots[1])
    server.integrity()
    assert server.delete("/v1/sessions/rw").status_code == 200
    assert server.idle()["pinned_blocks"] == before["pinned_blocks"]


def test_export_then_import_continues_as_the_reference(stateful_server, reference):
    server = stateful_server
    server.fresh_session("exp", 90, seed=8)
    _turn(server, "exp", [1, 2, 3])
    exported = server.get("/v1/sessions/exp/export").json()
    assert exported["format"] == "vllm-stateful.session.v1" and exported["version"] == 2
    tokens = exported["token_ids"]
    assert tokens == server.session("exp", tokens=True)["token_ids"]
    assert_error(server.post("/v1/sessions/import", json=exported), 409, "session_exists")
    assert server.delete("/v1/sessions/exp").status_code == 200

    assert_error(server.post("/v1/sessions/import", json={**exported, "digest": "0" * 32}), 400, "invalid_export")
    assert_error(server.post("/v1/sessions/import", json={**exported, "model": "other"}), 400, "model_mismatch")
    assert_error(server.post("/v1/sessions/import", json={**exported, "token_ids": [10**9]}), 400, "invalid_token_id")
    r = server.post("/v1/sessions/import", json=exported)
    assert r.status_code == 201, r.text
    imported = r.json()
    assert imported["version"] == 2 and imported["context_tokens"] == len(tokens)
    assert imported["state"] == "cold" and imported["restored"]["kv"] == "pending"
    got, meta = _turn(server, "exp", [4, 5], 5)
    assert got == reference.greedy(tokens + [4, 5], 5)
    restored = server.session("exp")["restored"]
    # how the KV came back: recomputed, or loaded from vLLM's prefix cache (blocks not yet evicted)
    assert restored["kv"] in ("recomputed", "loaded")
    assert restored["recomputed_tokens"] == meta["recomputed_tokens"] <= len(tokens)
    assert server.session("exp")["state"] == "resident"
    # another tenant imports the same export as its own session
    other = server.as_tenant(KEY_B)
    assert other.post("/v1/sessions/import", json=exported).status_code == 201
    for s in (server, other):
        assert s.delete("/v1/sessions/exp").status_code == 200
    server.integrity()
