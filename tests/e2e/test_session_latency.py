"""The inter-turn latency benchmark's shape (benchmarks/session_latency.py), small and without timing:
concurrent sessions of many short turns keep exact context accounting and never recompute, their
outputs equal a stateless reference (stock vLLM, prefix caching off, full history each turn), random
turn lengths all complete, and deleting the sessions gives every block back.

Accounting checked on every turn (docs/api.md, implementation notes): ``context_tokens`` = history +
the turn's tokens; turn 1 prefills exactly its own tokens; after that ``new_tokens`` = tokens sent + 1
(the previous turn's last generated token had no KV yet), ``cached_tokens`` = the committed history - 1,
``recomputed_tokens`` = 0 and ``usage.prompt_tokens`` = ``new_tokens``."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.e2e

INPUT_LEN, GEN_LEN = 16, 8


def _turn(server, sid: str, new: list[int], gen: int) -> dict:
    body = {"model": "tiny", "prompt": new, "max_tokens": gen, "temperature": 0, "ignore_eos": True,
            "stateful": sid, "return_token_ids": True}  # fmt: skip
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _check_accounting(body: dict, turn: int, history: list[int], new: list[int], gen: int) -> None:
    s, usage = body["session"], body["usage"]
    where = f"{s['id']} turn {turn}"
    assert len(body["choices"][0]["token_ids"]) == gen, where  # ignore_eos: exactly max_tokens
    assert s["version"] == turn and s["context_tokens"] == len(history) + len(new), (where, s)
    assert s["recomputed_tokens"] == 0, (where, s)
    assert usage["prompt_tokens"] == s["new_tokens"] and usage["completion_tokens"] == gen, (where, usage)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if turn == 1:
        assert s["new_tokens"] == len(new) and not cached, (where, s, usage)
    else:
        assert s["new_tokens"] == len(new) + 1, (where, s)
        assert cached == len(history) - 1, (where, usage)  # the server runs --enable-prompt-tokens-details


def _drive(server, sid: str, turns: list[tuple[list[int], int]]) -> tuple[list[int], list[int], list[dict]]:
    """Run ``turns`` (new token ids, tokens to generate) on a new session ``sid``, checking every
    turn's accounting; returns (history, positions of generated tokens in it, session fields)."""
    assert server.post("/v1/sessions", json={"id": sid}).status_code == 201
    history: list[int] = []
    generated: list[int] = []
    fields: list[dict] = []
    for turn, (new, gen) in enumerate(turns, 1):
        body = _turn(server, sid, new, gen)
        _check_accounting(body, turn, history, new, gen)
        fields.append(body["session"])
        start = len(history) + len(new)
        generated += range(start, start + gen)
        history += new + body["choices"][0]["token_ids"]
    stored = server.session(sid, tokens=True)
    assert stored["token_ids"] == history and stored["context_tokens"] == len(history)
    assert stored["version"] == len(turns) and stored["state"] == "resident"
    return history, generated, fields


def _fixed_turns(rng: random.Random, n: int) -> list[tuple[list[int], int]]:
    return [([rng.randrange(100, 3000) for _ in range(INPUT_LEN)], GEN_LEN) for _ in range(n)]


def _random_turns(rng: random.Random, n: int) -> list[tuple[list[int], int]]:
    return [([rng.randrange(100, 3000) for _ in range(rng.randint(8, 64))], rng.randint(4, 32)) for _ in range(n)]


def _run_concurrently(server, plans: dict[str, list[tuple[list[int], int]]]) -> dict[str, tuple]:
    with ThreadPoolExecutor(len(plans)) as pool:
        futures = {sid: pool.submit(_drive, server, sid, turns) for sid, turns in plans.items()}
        return {sid: f.result() for sid, f in futures.items()}


def _delete_all(server, sids) -> None:
    for sid in sids:
        pinned = server.session(sid)["pinned_blocks"]
        r = server.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        assert r.json()["freed_blocks"] == pinned


def test_concurrent_sessions_30_turns_accounting_and_blocks_return(stateful_server, reference):
    server = stateful_server
    baseline = server.idle()["free_blocks"]
    plans = {f"slat-conc-{i}": _fixed_turns(random.Random(9100 + i), 30) for i in range(4)}
    results = _run_concurrently(server, plans)
    report = server.integrity()  # engine pins agree with the API's view
    assert set(plans) <= set(report["sessions"])
    for sid, (history, generated, fields) in results.items():
        # context grows by exactly the 16 sent + 8 generated per turn
        assert [f["context_tokens"] for f in fields] == [16 + 24 * k for k in range(30)], sid
        assert len(history) == 24 * 30
        # every generated token is the reference's greedy choice given everything before it
        assert reference.greedy_mismatches(history, generated) == [], sid
    _delete_all(server, plans)
    after = server.idle()
    assert after["free_blocks"] == baseline
    assert not set(plans) & set(after["sessions"])


def test_session_outputs_equal_stateless_full_history(stateful_server, reference):
    server = stateful_server
    sid = "slat-eq"
    turns = _fixed_turns(random.Random(9200), 12)
    history, _, _ = _drive(server, sid, turns)
    prompts, outputs, done = [], [], 0
    for new, gen in turns:
        prompts.append(history[:done] + new)
        outputs.append(history[done + len(new) : done + len(new) + gen])
        done += len(new) + gen
    expected = reference.greedy_many(prompts, GEN_LEN, ignore_eos=True)
    for turn, (got, want) in enumerate(zip(outputs, expected), 1):
        assert got == want, f"turn {turn}"
    _delete_all(server, [sid])


def test_random_lengths_all_turns_complete(stateful_server, reference):
    server = stateful_server
    baseline = server.idle()["free_blocks"]
    plans = {f"slat-rand-{i}": _random_turns(random.Random(9300 + i), 12) for i in range(4)}
    results = _run_concurrently(server, plans)
    for sid, (history, generated, _) in results.items():
        assert len(history) == sum(len(new) + gen for new, gen in plans[sid])
        assert reference.greedy_mismatches(history, generated) == [], sid
    server.integrity()
    _delete_all(server, plans)
    assert server.idle()["free_blocks"] == baseline
