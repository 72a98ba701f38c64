"""Hardening, engine side: forged tags, reservations, lifecycle operations,
pin drift, engine-killing parameters, abandoned and aborted requests.
Numbers refer to the items of the hardening issue (#8)."""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import AUTH_A, BLOCK_SIZE, MAX_MODEL_LEN, assert_error, wait_until

pytestmark = pytest.mark.e2e

AUTH = AUTH_A


def _query(server, sid: str, prompt: list[int], n: int = 4) -> dict:
    r = server.complete(sid, prompt, n, commit=False)
    assert r.status_code == 200, r.text
    return r.json()


# --- 1. forged engine tags --------------------------------------------------------------------


def test_forged_session_tags_reach_no_session_on_any_route(stateful_server):
    sid = "victim-1"
    stateful_server.fresh_session(sid, 150, seed=1)
    before = stateful_server.session(sid, tokens=True)
    expected = _query(stateful_server, sid, [5, 6, 7])
    baseline = stateful_server.idle()
    forged = stateful_server.metric('vllm_stateful:engine_events{event="forged_tags"}')
    xargs = {"stateful_session": sid, "stateful_commit": True}
    body = {"model": "tiny", "prompt": before["token_ids"] + [9] * 40, "max_tokens": 4, "vllm_xargs": xargs}
    # through the plugin's own routes the reserved keys are refused outright
    assert_error(stateful_server.post("/v1/completions", json=body), 400, "invalid_request")
    # /invocations is vLLM's and outside --api-key: the engine must ignore the unsigned tag
    for i in range(4):
        r = httpx.post(
            stateful_server.root + "/invocations", json={**body, "vllm_xargs": {**xargs, "n": i}}, timeout=60
        )
        assert r.status_code == 200, r.text
    after_attack = stateful_server.idle()
    assert after_attack["free_blocks"] == baseline["free_blocks"]  # nothing pinned under any id
    after = stateful_server.session(sid, tokens=True)
    assert (after["token_ids"], after["version"], after["pinned_blocks"]) == (
        before["token_ids"],
        before["version"],
        before["pinned_blocks"],
    )
    again = _query(stateful_server, sid, [5, 6, 7])
    assert again["session"]["recomputed_tokens"] == 0
    assert again["choices"][0]["token_ids"] == expected["choices"][0]["token_ids"]
    wait_until(
        lambda: stateful_server.metric('vllm_stateful:engine_events{event="forged_tags"}') >= forged + 4,
        what="forged tags counted",
    )
    stateful_server.delete(f"/v1/sessions/{sid}")


# --- 2. reservations: concurrent growth cannot overshoot the budget --------------------------


def test_concurrent_sessions_reserve_before_work_and_get_429_with_retry_after(stateful_server):
    baseline = stateful_server.idle()
    budget, charged = baseline["budget_blocks"], baseline["charged_blocks"]
    n_tokens = 1400
    per_session = -(-(n_tokens) // BLOCK_SIZE)
    fits = (budget - charged) // per_session
    rng = random.Random(2)
    prompts = [[rng.randrange(10, 3000) for _ in range(n_tokens)] for _ in range(fits + 4)]

    def create(i):
        return i, httpx.post(
            stateful_server.root + "/v1/sessions",
            json={"id": f"budget-{i}", "prompt": prompts[i]},
            headers=AUTH,
            timeout=300,
        )

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(create, range(len(prompts))))
    created = [i for i, r in replies if r.status_code == 201]
    refused = [r for _, r in replies if r.status_code != 201]
    assert len(created) == fits, [r.text for r in refused]
    for r in refused:
        assert_error(r, 429, "cell_budget_exceeded")
        assert int(r.headers["Retry-After"]) >= 1
    report = stateful_server.idle()
    assert report["charged_blocks"] <= budget
    for i in created:
        s = stateful_server.session(f"budget-{i}", tokens=True)
        assert s["token_ids"] == prompts[i] and s["state"] == "resident" and s["version"] == 1
    for i in range(len(prompts)):
        assert stateful_server.get(f"/v1/sessions/budget-{i}").status_code == (200 if i in created else 404)
    # headroom: with the budget full, the largest stateless request still runs
    big = httpx.post(
        stateful_server.base_url + "/completions",
        headers=AUTH,
        timeout=300,
        json={"model": "tiny", "prompt": prompts[0][:1000] * 2, "max_tokens": MAX_MODEL_LEN - 2000, "ignore_eos": True},
    )
    assert big.status_code == 200 and big.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - 2000
    for i in created:
        assert stateful_server.delete(f"/v1/sessions/budget-{i}").status_code == 200
    assert stateful_server.idle()["free_blocks"] == baseline["free_blocks"]


# --- 7. vLLM lifecycle operations never crash and never serve stale KV -------------------------


def test_prefix_cache_reset_releases_sessions_which_recompute_correctly(stateful_server, reference):
    sid = "lifecycle-reset"
    prompt = stateful_server.fresh_session(sid, 200, seed=7)
    r = httpx.post(stateful_server.root + "/reset_prefix_cache", timeout=60)
    assert r.status_code == 200 and r.json() == {"success": True}, r.text
    cold = wait_until(lambda: (s := stateful_server.session(sid))["state"] == "cold" and s, what="session marked cold")
    assert cold["pinned_blocks"] == 0 and cold["version"] == 1
    turn = stateful_server.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": [11, 12],
            "max_tokens": 5,
            "temperature": 0,
            "stateful": sid,
            "return_token_ids": True,
        },
    ).json()
    # honest accounting: the history was recomputed, and the answer is still right
    assert turn["session"]["recomputed_tokens"] == len(prompt)
    assert turn["choices"][0]["token_ids"] == reference.greedy(prompt + [11, 12], 5)
    assert stateful_server.session(sid)["state"] == "resident"
    stateful_server.integrity()
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_pause_with_cache_clear_aborts_running_session_work_cleanly(stateful_server):
    sid = "lifecycle-pause"
    stateful_server.fresh_session(sid, 100, seed=8)
    before = stateful_server.session(sid, tokens=True)
    turn = {"model": "tiny", "prompt": [7], "max_tokens": 50, "ignore_eos": True, "stateful": sid}
    with stateful_server.held_request("/v1/completions", turn) as held:
        # vLLM's default pause: abort everything, then clear the caches (raised while pinned before)
        paused = httpx.post(
            stateful_server.root + "/pause", params={"mode": "abort", "clear_cache": "true"}, timeout=60
        )
        assert paused.status_code == 200, paused.text
    assert_error(held.result(), 503, "engine_aborted")
    after = stateful_server.session(sid, tokens=True)
    assert (after["token_ids"], after["version"]) == (before["token_ids"], before["version"])
    assert _query(stateful_server, sid, [1, 2])["session"]["context_tokens"] == len(before["token_ids"]) + 2
    stateful_server.delete(f"/v1/sessions/{sid}")
    stateful_server.idle()


def test_weight_reload_drops_session_kv(stateful_server, reference):
    sid = "lifecycle-weights"
    prompt = stateful_server.fresh_session(sid, 120, seed=9)
    r = httpx.post(stateful_server.root + "/collective_rpc", json={"method": "reload_weights"}, timeout=120)
    assert r.status_code == 200, r.text
    wait_until(lambda: stateful_server.session(sid)["state"] == "cold", what="session marked cold")
    turn = _query(stateful_server, sid, [3, 4], 5)
    assert turn["session"]["recomputed_tokens"] == len(prompt)
    assert turn["choices"][0]["token_ids"] == reference.greedy(prompt + [3, 4], 5)
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_pause_keeps_acknowledged_appends_which_are_ingested_after_resume(stateful_server):
    """vLLM's default pause aborts every request, background ingestion included: the acknowledged
    appends are retried after resume, never dropped and never fail the session."""
    ids = [f"pause-append-{i}" for i in range(4)]
    chunks = {sid: [[300 + 7 * i + j for j in range(120)] for i in range(3)] for sid in ids}
    for sid in ids:
        assert stateful_server.post("/v1/sessions", json={"id": sid}).status_code == 201
    try:
        for i in range(3):
            for sid in ids:
                r = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": chunks[sid][i]})
                assert r.status_code == 202, r.text
        assert httpx.post(stateful_server.root + "/pause", params={"mode": "abort"}, timeout=60).status_code == 200
        time.sleep(1.0)
    finally:
        assert httpx.post(stateful_server.root + "/resume", timeout=60).status_code == 200
    for sid in ids:
        r = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [9], "wait": True}, timeout=120)
        assert r.status_code == 200, r.text
        s = stateful_server.session(sid, tokens=True)
        assert s["state"] == "resident" and s["version"] == 4
        assert s["token_ids"] == [t for c in chunks[sid] for t in c] + [9]
        assert stateful_server.delete(f"/v1/sessions/{sid}").status_code == 200
    stateful_server.integrity()


def test_a_turn_running_across_a_weight_update_does_not_pin_old_kv(stateful_server, reference):
    for attempt in range(3):  # the turn must still be running when vLLM pauses (a starved runner may be late)
        sid = f"lifecycle-inflight-{attempt}"
        stateful_server.fresh_session(sid, 150, seed=11)
        stateful_server.idle()  # the only request in the engine will be this turn
        if _turn_across_weight_update(stateful_server, sid):
            break
        stateful_server.delete(f"/v1/sessions/{sid}")
    else:
        pytest.fail("the turn finished before vLLM paused, three times")
    after = stateful_server.session(sid, tokens=True)
    assert after["version"] == 2 and after["pinned_blocks"] == 0 and after["state"] == "cold"
    history = after["token_ids"]
    q = _query(stateful_server, sid, [3, 4], 5)
    # nothing computed before the update is reused: neither the pin nor the prefix cache
    assert q["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert q["session"]["recomputed_tokens"] == len(history) - 1
    assert q["choices"][0]["token_ids"] == reference.greedy(history + [3, 4], 5)
    stateful_server.delete(f"/v1/sessions/{sid}")


def _turn_across_weight_update(server, sid: str) -> bool:
    """A streamed turn that has computed KV is paused, the weights reload, it resumes and ends.
    False (nothing asserted) when the turn had already finished at the pause."""
    turn = {"model": "tiny", "prompt": [7], "max_tokens": 1300, "ignore_eos": True, "stream": True, "stateful": sid}
    try:
        with httpx.stream("POST", server.base_url + "/completions", json=turn, headers=AUTH, timeout=120) as s:
            lines = s.iter_lines()
            assert '"text"' in next(lines)  # computing (the session's quota is 1536 tokens)
            r = httpx.post(server.root + "/pause", params={"mode": "keep", "clear_cache": "false"}, timeout=60)
            assert r.status_code == 200, r.text
            if (b := server.integrity())["running"] + b["waiting"] == 0 or server.session(sid)["version"] != 1:
                return False
            r = httpx.post(server.root + "/collective_rpc", json={"method": "reload_weights"}, timeout=120)
            assert r.status_code == 200, r.text
            assert httpx.post(server.root + "/resume", timeout=60).status_code == 200
            rest = [line for line in lines if line]
    finally:
        httpx.post(server.root + "/resume", timeout=60)
    assert rest[-1] == "data: [DONE]"
    return True


# --- 9. pins never drift past the API's history ------------------------------------------------


def test_disconnect_storm_leaves_engine_pins_equal_to_the_api_view(stateful_server):
    baseline = stateful_server.idle()["free_blocks"]
    sid = "drift-1"
    stateful_server.fresh_session(sid, 70, seed=10)
    url = stateful_server.base_url + "/completions"
    for i in range(12):
        turn = {
            "model": "tiny",
            "prompt": [20 + i] * 40,
            "max_tokens": 300,
            "ignore_eos": True,
            "stream": True,
            "stateful": sid,
        }
        with httpx.stream("POST", url, json=turn, headers=AUTH, timeout=60) as resp:
            next(resp.iter_lines())  # the turn runs; hang up at once
        if i % 3 == 0:
            _query(stateful_server, sid, [1])
    report = stateful_server.idle()
    s = stateful_server.session(sid, tokens=True)
    # each turn was rolled back, or committed in full if it finished before the hang-up was noticed
    assert len(s["token_ids"]) == 70 + (s["version"] - 1) * (40 + 300)
    assert report["free_blocks"] == baseline - s["pinned_blocks"]  # no block pinned beyond the API's view
    stateful_server.delete(f"/v1/sessions/{sid}")


# --- 11. parameters that would stop the engine are refused as vLLM refuses them ---------------


def test_max_tokens_zero_is_a_400_and_the_engine_keeps_serving(stateful_server, client):
    url = stateful_server.base_url
    for path, body in (
        ("/completions", {"prompt": "x", "max_tokens": 0, "stateful": "mt0-a"}),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0, "stateful": "mt0-b"}),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0, "stateful": "mt0-c"},
        ),
        ("/completions", {"prompt": "x", "max_tokens": -3, "stateful": "mt0-d"}),
        ("/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 5, "stateful": "mt0-e"}),
        ("/completions", {"prompt": "x", "max_tokens": 2, "temperature": -1, "stateful": "mt0-f"}),
    ):
        r = httpx.post(url + path, json={"model": "tiny", **body}, headers=AUTH, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert stateful_server.get(f"/v1/sessions/{body['stateful']}").status_code == 404
    # other clients are still served: stateless, and a new session
    ok = client.completions.create(model="tiny", prompt="still alive", max_tokens=3, timeout=30)
    assert ok.usage.completion_tokens == 3
    s = client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"stateful": "mt0-ok"}, timeout=30)
    assert s.model_extra["session"]["version"] == 1
    assert httpx.get(stateful_server.root + "/health", timeout=10).status_code == 200
    stateful_server.delete("/v1/sessions/mt0-ok")


# --- 15. abandoned non-streaming requests are aborted and rolled back --------------------------


def test_abandoned_non_streaming_turns_are_aborted_and_commit_nothing(stateful_server):
    server, sid = stateful_server, "abandoned-1"
    server.fresh_session(sid, 40, seed=15)
    before = server.session(sid, tokens=True)
    body = {"model": "tiny", "prompt": [5], "max_tokens": 1400, "ignore_eos": True, "stateful": sid}
    server.idle()
    # vLLM paused: the client's 0.5 s timeout certainly passes before anything is generated, on any
    # machine; the server must notice it left and abort the request (aborts run while paused)
    for request in (body, {**body, "stateful_commit": False}):  # a turn, then a query
        with server.paused():
            with pytest.raises(httpx.TimeoutException):
                httpx.post(server.base_url + "/completions", json=request, headers=AUTH, timeout=0.5)
            wait_until(lambda: (b := server.integrity())["waiting"] + b["running"] == 0, what="request aborted")
        server.idle()
        after = server.session(sid, tokens=True)
        assert (after["token_ids"], after["version"]) == (before["token_ids"], before["version"])
    server.delete(f"/v1/sessions/{sid}")


# --- 19. a query cut short by DELETE ends with the same 404 a turn gets -------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_query_cut_short_by_delete_is_a_404(stateful_server, stream):
    """Non-streaming: a query admitted (vLLM paused) when its session is deleted gets the 404.
    Streaming: a query already streaming when vLLM pauses and its session is deleted ends its
    stream with the same error, then [DONE]."""
    for attempt in range(3):  # streaming: the query must still be in the engine at the pause
        sid = f"cut-query-{int(stream)}-{attempt}"
        stateful_server.fresh_session(sid, 40, seed=19)
        stateful_server.idle()
        if not stream:
            return _cut_admitted_query(stateful_server, sid)
        if _cut_streaming_query(stateful_server, sid):
            return
        stateful_server.delete(f"/v1/sessions/{sid}")
    pytest.fail("the streamed query finished before vLLM paused, three times")


def _cut_query_body(sid: str, stream: bool) -> dict:
    return {"model": "tiny", "prompt": [5], "max_tokens": 1400, "ignore_eos": True, "stateful": sid,
            "stateful_commit": False, "stream": stream}  # fmt: skip


def _cut_admitted_query(server, sid: str) -> None:
    result: dict = {}
    url, body = server.base_url + "/completions", _cut_query_body(sid, False)
    t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(url, json=body, headers=AUTH, timeout=120)))
    with server.paused():  # admitted, and cannot finish before the DELETE on any machine
        t.start()
        wait_until(lambda: (b := server.integrity())["waiting"] + b["running"] > 0, what="query admitted")
        assert server.delete(f"/v1/sessions/{sid}").status_code == 200
    t.join(60)
    assert_error(result["r"], 404, "session_not_found")


def _cut_streaming_query(server, sid: str) -> bool:
    """False (nothing asserted) when the query had finished before vLLM paused."""
    url, body = server.base_url + "/completions", _cut_query_body(sid, True)
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=120) as resp:
        lines = resp.iter_lines()
        assert '"text"' in next(lines)  # streaming
        with server.paused():
            if (b := server.integrity())["waiting"] + b["running"] == 0:
                return False
            assert server.delete(f"/v1/sessions/{sid}").status_code == 200
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"session_not_found"' in rest[-2], rest[-2:]
    return True
