"""Hardening, API side: ingestion faults, id reuse, expiry, limits, ids,
options, stop strings, abandoned first requests, acknowledged appends.
Numbers refer to the items of the hardening issue (#8)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import AUTH_A, MAX_BODY_BYTES, SESSION_QUOTA, assert_error, wait_until

pytestmark = pytest.mark.e2e

AUTH = AUTH_A


def _unchanged(server, sid: str, before: dict) -> None:
    after = server.session(sid, tokens=True)
    assert (after["token_ids"], after["version"], after["pinned_blocks"], after["state"]) == (
        before["token_ids"],
        before["version"],
        before["pinned_blocks"],
        before["state"],
    )


class _Stream:
    """A streaming turn held open: the turn runs (and holds its session) until ``finish()``."""

    def __init__(self, url: str, body: dict) -> None:
        self.cm = httpx.stream("POST", url, json={**body, "stream": True}, headers=AUTH, timeout=120)
        self.resp = self.cm.__enter__()
        self.lines = self.resp.iter_lines()
        self.first = next(self.lines)

    def finish(self) -> list[str]:
        rest = [line for line in self.lines if line]
        self.cm.__exit__(None, None, None)
        return rest

    def hang_up(self) -> None:
        self.cm.__exit__(None, None, None)


# --- 3. a failing ingestion fails the session, releases its waiters, and the drain survives ---


def test_ingestion_template_error_fails_the_session_and_releases_waiters(stateful_server):
    url = stateful_server.base_url
    sid = "tmpl-fail"
    assert stateful_server.post("/v1/sessions", json={"id": sid}).status_code == 201
    failures = stateful_server.metric("vllm_stateful:ingest_failures_total")
    turn = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stateful": sid}
    waiter = {}
    t = threading.Thread(
        target=lambda: waiter.setdefault(
            "r", stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [5], "wait": True}, timeout=60)
        )
    )
    with stateful_server.held_request("/v1/chat/completions", turn) as held:
        # acknowledged now (rendered after no assistant reply); ingested after the turn adds one, which the
        # server's chat template (--chat-template, with a raise_exception rule) refuses
        tool = {"messages": [{"role": "tool", "content": "x"}]}
        ack = stateful_server.post(f"/v1/sessions/{sid}/append", json=tool)
        assert ack.status_code == 202, ack.text
        t.start()  # an append queued behind it, waiting for its ingestion
        wait_until(lambda: stateful_server.session(sid)["version"] == 2, what="second append acknowledged")
    assert held.result().status_code == 200
    t.join(60)
    # the append queued behind the failed one is released with the error, promptly
    assert "r" in waiter, "waiter still blocked"
    r = waiter["r"]
    assert r.status_code in (409, 202) and (r.status_code == 202 or r.json()["error"]["code"] == "session_failed")
    s = wait_until(lambda: (x := stateful_server.session(sid))["state"] == "failed" and x, what="failed state")
    assert "chat template" in s["error"]
    q = httpx.post(
        url + "/completions",
        headers=AUTH,
        timeout=30,
        json={"model": "tiny", "prompt": [1], "max_tokens": 1, "stateful": sid, "stateful_commit": False},
    )
    assert_error(q, 409, "session_failed")
    assert stateful_server.metric("vllm_stateful:ingest_failures_total") == failures + 1
    freed = stateful_server.delete(f"/v1/sessions/{sid}").json()
    assert freed["deleted"] is True
    # the drain task survived its failure: a new session under the same id ingests normally
    assert stateful_server.post("/v1/sessions", json={"id": sid}).status_code == 201
    ok = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [7, 8], "wait": True})
    assert ok.status_code == 200 and ok.json()["context_tokens"] == 2
    stateful_server.delete(f"/v1/sessions/{sid}")
    stateful_server.integrity()


def test_append_the_template_refuses_at_once_is_a_400_and_changes_nothing(stateful_server, client):
    sid = "tmpl-ack"
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_body={"stateful": sid}
    )
    before = stateful_server.session(sid, tokens=True)
    r = stateful_server.post(f"/v1/sessions/{sid}/append", json={"messages": [{"role": "tool", "content": "x"}]})
    assert_error(r, 400, "template_error")
    _unchanged(stateful_server, sid, before)
    stateful_server.delete(f"/v1/sessions/{sid}")


# --- 4. a reused id is a new session, end to end ----------------------------------------------


def test_id_reused_after_delete_never_sees_or_loses_the_old_incarnation(stateful_server):
    url = stateful_server.base_url
    sid = "reuse-1"
    for round_ in range(4):
        assert stateful_server.post("/v1/sessions", json={"id": sid, "prompt": [40 + round_] * 50}).status_code == 201
        turn = _Stream(
            url + "/completions",
            {"model": "tiny", "prompt": [1], "max_tokens": 500, "ignore_eos": True, "stateful": sid},
        )
        for i in range(3):  # queued behind the running turn, in the old incarnation
            assert stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [900 + i]}).status_code == 202
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            deleting = pool.submit(stateful_server.delete, f"/v1/sessions/{sid}")
            created = pool.submit(
                lambda: wait_until(
                    lambda: (r := stateful_server.post("/v1/sessions", json={"id": sid})).status_code == 201 and r,
                    what="re-create",
                )
            )
            assert deleting.result().status_code == 200 and created.result().status_code == 201
        turn.hang_up()
        new = [2000 + round_, 2001, 2002]
        r = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": new, "wait": True})
        assert r.status_code == 200, r.text
        s = stateful_server.session(sid, tokens=True)
        assert s["token_ids"] == new and s["version"] == 1  # nothing of the old incarnation
        stateful_server.idle()
        s = stateful_server.session(sid, tokens=True)
        assert s["token_ids"] == new and s["pinned_blocks"] == 1  # the old close released nothing of it
        q = stateful_server.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": [3, 4], "max_tokens": 2, "stateful": sid, "stateful_commit": False},
        ).json()
        assert q["session"]["recomputed_tokens"] == 0 and q["session"]["context_tokens"] == 5
        assert stateful_server.delete(f"/v1/sessions/{sid}").status_code == 200
    stateful_server.integrity()


def test_append_to_a_recreated_id_lands_in_the_new_incarnation(stateful_server):
    """The old incarnation's ingestion is still pending (vLLM is paused, with a query of another
    session admitted) when the id is deleted and created again; the new session's append must be
    its own, and ingested once the engine runs again."""
    assert stateful_server.post("/v1/sessions", json={"id": "reuse-q", "prompt": [5] * 20}).status_code == 201
    stateful_server.idle()
    query = {"model": "tiny", "prompt": [6], "max_tokens": 200, "ignore_eos": True, "stateful": "reuse-q",
             "stateful_commit": False}  # fmt: skip
    sid = "reuse-2"
    with stateful_server.held_request("/v1/completions", query) as answer:
        assert stateful_server.post("/v1/sessions", json={"id": sid}).status_code == 201
        assert stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [901]}).status_code == 202
        assert stateful_server.session(sid)["queued_tokens"] == 1  # still pending when the id is deleted
        assert stateful_server.delete(f"/v1/sessions/{sid}").status_code == 200
        assert stateful_server.post("/v1/sessions", json={"id": sid}).status_code == 201
        r = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [2001, 2002]})
        assert r.status_code == 202, r.text
        s = stateful_server.session(sid, tokens=True)
        assert s["token_ids"] == [] and s["queued_tokens"] == 2, s  # acknowledged, not ingested yet
    assert answer.result().status_code == 200
    s = wait_until(lambda: (b := stateful_server.session(sid, tokens=True))["queued_tokens"] == 0 and b, what="ingest")
    assert s["token_ids"] == [2001, 2002] and s["version"] == 1, s
    assert stateful_server.idle()["api_sessions"][sid] == 1  # its one block, pinned
    for name in (sid, "reuse-q"):
        assert stateful_server.delete(f"/v1/sessions/{name}").status_code == 200
    stateful_server.integrity()


# --- 5. TTL expiry survives DELETEs racing it --------------------------------------------------


def test_expiry_keeps_running_when_deletes_race_it(stateful_server):
    """DELETEs land while an expiry pass is closing a batch of sessions one by one (each close waits
    for the engine, which a stateless load keeps busy); afterwards expiry still works."""
    errors = stateful_server.metric("vllm_stateful:background_errors_total")
    stop = threading.Event()

    def load():
        body = {"model": "tiny", "prompt": list(range(100, 1600)), "max_tokens": 50, "ignore_eos": True}
        while not stop.is_set():
            httpx.post(stateful_server.base_url + "/completions", json=body, headers=AUTH, timeout=120)

    def delete_later(order_and_id) -> int:
        order, sid = order_and_id
        time.sleep(order * 0.05)
        return stateful_server.delete(f"/v1/sessions/{sid}").status_code

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        loaders = [pool.submit(load) for _ in range(2)]
        try:
            for round_ in range(4):
                ids = [f"race-{round_}-{i}" for i in range(30)]
                for sid in ids:
                    r = stateful_server.post("/v1/sessions", json={"id": sid, "ttl_s": 1, "prompt": [5, 6]})
                    assert r.status_code == 201
                time.sleep(0.9)
                # spread over the next expiry passes, newest first (a pass closes the oldest first)
                codes = list(pool.map(delete_later, enumerate(reversed(ids))))
                assert set(codes) <= {200, 404}
        finally:
            stop.set()
            for f in loaders:
                f.result()
    # expiry is still alive
    assert stateful_server.post("/v1/sessions", json={"id": "race-last", "ttl_s": 1}).status_code == 201
    wait_until(lambda: stateful_server.get("/v1/sessions/race-last").status_code == 404, 15, "expiry")
    assert stateful_server.metric("vllm_stateful:background_errors_total") == errors
    stateful_server.integrity()


# --- 12. oversized bodies are refused before any work --------------------------------------------


def test_oversized_bodies_are_413_before_parsing_or_tokenizing(stateful_server):
    sid = "big-body"
    assert stateful_server.post("/v1/sessions", json={"id": sid, "prompt": [5, 6, 7]}).status_code == 201
    before = stateful_server.session(sid, tokens=True)
    huge = "lorem ipsum " * (MAX_BODY_BYTES // 10)
    assert_error(stateful_server.post(f"/v1/sessions/{sid}/append", json={"text": huge}), 413, "request_too_large")
    assert_error(stateful_server.post("/v1/sessions", json={"prompt": huge}), 413, "request_too_large")
    assert_error(
        stateful_server.post("/v1/completions", json={"model": "tiny", "prompt": huge, "stateful": sid}),
        413,
        "request_too_large",
    )
    assert_error(
        stateful_server.post(
            "/v1/completions", json={"model": "tiny", "prompt": huge}, headers={"X-Stateful-Session": sid}
        ),
        413,
        "request_too_large",
    )
    # under the byte limit but surely over the context: refused without tokenizing it
    long_text = "x" * (MAX_BODY_BYTES - 1000)
    err = assert_error(
        stateful_server.post(f"/v1/sessions/{sid}/append", json={"text": long_text}), 413, "append_too_large"
    )
    assert "tokens" in err["message"]
    _unchanged(stateful_server, sid, before)
    stateful_server.delete(f"/v1/sessions/{sid}")


# --- 13. ttl_s is bounded and validated before anything is created ------------------------------


def test_ttl_values_a_client_cannot_set(stateful_server):
    url = stateful_server.root + "/v1/sessions"
    for raw in (
        '{"id": "ttl-x", "ttl_s": 1e999}',
        '{"id": "ttl-x", "ttl_s": NaN}',
        '{"id": "ttl-x", "ttl_s": 0}',
        '{"id": "ttl-x", "ttl_s": -1}',
        '{"id": "ttl-x", "ttl_s": 1e9}',
        '{"id": "ttl-x", "ttl_s": "10"}',
    ):
        r = httpx.post(url, content=raw, headers={**AUTH, "content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert stateful_server.get("/v1/sessions/ttl-x").status_code == 404
    listed = stateful_server.get("/v1/sessions")
    assert listed.status_code == 200 and "ttl-x" not in {s["id"] for s in listed.json()["data"]}


# --- 14. running work counts as use -------------------------------------------------------------


def test_session_does_not_expire_under_a_running_query(stateful_server):
    sid = "busy-ttl"
    # a TTL of 5 s: the session must not expire between this test's own requests, whenever this
    # process is stopped (a few seconds at most on a loaded 2-core machine)
    assert stateful_server.post("/v1/sessions", json={"id": sid, "ttl_s": 5, "prompt": [5] * 30}).status_code == 201
    body = {"model": "tiny", "prompt": [6], "max_tokens": 20, "ignore_eos": True, "stateful": sid,
            "stateful_commit": False}  # fmt: skip
    with stateful_server.held_request("/v1/completions", body) as query:
        time.sleep(7)  # the query stays in flight, frozen, well past the session's 5 s TTL
    r = query.result()
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 20
    assert stateful_server.get(f"/v1/sessions/{sid}").status_code == 200  # idle time starts after the query
    wait_until(lambda: stateful_server.get(f"/v1/sessions/{sid}").status_code == 404, 30, "expiry after the query")


# --- 16. stop strings: the session keeps exactly what its client was sent -----------------------


def test_stop_string_cut_inside_a_token_keeps_only_the_sent_text(stateful_server, tokenizer, reference):
    prompt = list(range(300, 340))
    ids = reference.greedy(prompt, 24)
    text = tokenizer.decode(ids)
    # a one-character stop string: the second character of a multi-character token mid-output
    cut = None
    for k in range(2, len(ids) - 2):
        offset = len(tokenizer.decode(ids[:k]))
        piece = tokenizer.decode(ids[: k + 1])[offset:]
        if len(piece) >= 2 and text.startswith(tokenizer.decode(ids[:k])) and piece[1].strip():
            if piece[1] not in text[: offset + 1]:
                cut = (k, offset + 1, piece[1])
                break
    assert cut is not None, f"no token to cut in {text!r}"
    k, start, stop = cut
    sid = "stop-cut"
    assert stateful_server.post("/v1/sessions", json={"id": sid, "prompt": prompt[:-1]}).status_code == 201
    r = stateful_server.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": prompt[-1:],
            "max_tokens": 24,
            "temperature": 0,
            "stop": [stop],
            "stateful": sid,
        },
    )
    assert r.status_code == 200, r.text
    sent = r.json()["choices"][0]["text"]
    assert sent == text[:start] and r.json()["choices"][0]["finish_reason"] == "stop"
    history = stateful_server.session(sid, tokens=True)["token_ids"]
    assert tokenizer.decode(history[len(prompt) :]) == sent  # not one character more
    assert history[len(prompt) : len(prompt) + k] == ids[:k]  # the generated ids it keeps, KV and all
    nxt = stateful_server.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": [77],
            "max_tokens": 5,
            "temperature": 0,
            "stateful": sid,
            "return_token_ids": True,
        },
    ).json()
    assert nxt["choices"][0]["token_ids"] == reference.greedy(history + [77], 5)
    stateful_server.delete(f"/v1/sessions/{sid}")


# --- 17. ids must match as a whole -------------------------------------------------------------


def test_ids_with_a_trailing_newline_are_refused_everywhere(stateful_server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    assert_error(stateful_server.post("/v1/completions", json={**body, "stateful": "abc\n"}), 400, "invalid_session_id")
    assert_error(stateful_server.post("/v1/sessions", json={"id": "abc\n"}), 400, "invalid_session_id")
    assert_error(stateful_server.get("/v1/sessions/abc%0A"), 400, "invalid_session_id")
    r = httpx.post(
        stateful_server.base_url + "/completions",
        json=body,
        timeout=30,
        headers={**AUTH, "X-Stateful-Session": "abc def"},
    )
    assert_error(r, 400, "invalid_session_id")
    assert "abc" not in {s["id"].strip() for s in stateful_server.get("/v1/sessions").json()["data"]}


# --- 18. a first request that commits nothing leaves no session --------------------------------


def test_first_streaming_requests_that_disconnect_leave_no_session(stateful_server):
    url = stateful_server.base_url + "/completions"
    ids = [f"first-dc-{i}" for i in range(8)]
    for sid in ids:
        turn = _Stream(
            url, {"model": "tiny", "prompt": [5, 6], "max_tokens": 1000, "ignore_eos": True, "stateful": sid}
        )
        turn.hang_up()
    stateful_server.idle()

    def settled(sid: str) -> bool:
        r = stateful_server.get(f"/v1/sessions/{sid}")
        # gone, or (if the turn finished before the hang-up was noticed) committed in full: never empty
        return r.status_code == 404 or (r.json()["version"] == 1 and r.json()["context_tokens"] == 2 + 1000)

    wait_until(lambda: all(settled(sid) for sid in ids), 10, "cleanup")
    listed = {s["id"]: s for s in stateful_server.get("/v1/sessions").json()["data"]}
    assert all(listed[sid]["version"] == 1 for sid in set(ids) & set(listed))
    for sid in set(ids) & set(listed):
        stateful_server.delete(f"/v1/sessions/{sid}")


# --- 20. options a session cannot honour are refused, never ignored ----------------------------


@pytest.mark.parametrize(
    "chat,extra,param",
    [
        (False, {"logprobs": 0}, "logprobs"),
        (False, {"best_of": 2}, "best_of"),
        (False, {"echo": True}, "echo"),
        (False, {"suffix": "x"}, "suffix"),
        (False, {"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
        (False, {"prompt_logprobs": 1}, "prompt_logprobs"),
        (False, {"cache_salt": "mine"}, "cache_salt"),
        (False, {"n": 2}, "n"),
        (True, {"logprobs": True}, "logprobs"),
        (True, {"logprobs": True, "top_logprobs": 2}, "logprobs"),
        (True, {"continue_final_message": True, "add_generation_prompt": False}, "add_generation_prompt"),
        (True, {"chat_template": "{{ 'x' }}"}, "chat_template"),
        (True, {"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
        (True, {"add_generation_prompt": False}, "add_generation_prompt"),
        (True, {"echo": True}, "echo"),
        (True, {"documents": [{"title": "a", "text": "b"}]}, "documents"),
        (True, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        (True, {"kv_transfer_params": {"x": 1}}, "kv_transfer_params"),
    ],
)
def test_unsupported_options_are_a_400(stateful_server, chat, extra, param):
    sid = "opts-1"
    if stateful_server.get(f"/v1/sessions/{sid}").status_code == 404:
        assert stateful_server.post("/v1/sessions", json={"id": sid, "prompt": [5, 6]}).status_code == 201
    before = stateful_server.session(sid, tokens=True)
    content = {"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}
    body = {"model": "tiny", "max_tokens": 2, "stateful": sid, **content, **extra}
    r = stateful_server.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    err = assert_error(r, 400, "unsupported_in_session")
    assert err["param"] == param or (param, err["param"]) == ("tools", "tool_choice")
    _unchanged(stateful_server, sid, before)


def test_defaults_sent_explicitly_and_honoured_options_are_accepted(stateful_server, client):
    sid = "opts-ok"
    r = client.completions.create(
        model="tiny",
        prompt="x",
        max_tokens=2,
        echo=False,
        logprobs=None,
        n=1,
        seed=3,
        stop=["zzz"],
        extra_body={"stateful": sid, "priority": 0, "add_special_tokens": True, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 2
    # vLLM's own validation refuses in our format
    refused = stateful_server.post(
        "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "stateful": sid, "top_p": 0}
    )
    err = assert_error(refused, 400, "invalid_request")
    assert err["param"] == "top_p" and "top_p" in err["message"]
    assert stateful_server.session(sid)["version"] == 1
    stateful_server.delete(f"/v1/sessions/{sid}")


# --- 21. an acknowledged append cannot fail later on context or quota ---------------------------


def test_append_reserves_room_for_the_turn_in_flight(stateful_server):
    sid = "ack-room"
    history = list(range(100, 100 + 1200))
    assert stateful_server.post("/v1/sessions", json={"id": sid, "prompt": history}).status_code == 201
    turn = {"model": "tiny", "prompt": [5], "max_tokens": 300, "ignore_eos": True, "stateful": sid}
    with stateful_server.held_request("/v1/completions", turn) as held:
        # 1200 + (1 + 300 reserved by the running turn) + 100 > the 1536-token quota: refused now, not failed later
        r = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [7] * 100})
        assert_error(r, 429, "session_quota_exceeded")
        ok = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [7] * 20})
        assert ok.status_code == 202, ok.text
    assert held.result().status_code == 200
    done = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [8], "wait": True})
    assert done.status_code == 200, done.text
    s = done.json()
    assert s["state"] == "resident" and s["context_tokens"] == 1200 + 1 + 300 + 20 + 1 <= SESSION_QUOTA
    assert s["version"] == 4
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_json_with_duplicate_session_fields_and_garbage_is_refused(stateful_server):
    raw = json.dumps({"model": "tiny", "prompt": "x", "stateful": "dup-1", "stateful_commit": "yes"})
    r = httpx.post(
        stateful_server.base_url + "/completions",
        content=raw,
        timeout=30,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(r, 400, "invalid_request")
    r = httpx.post(
        stateful_server.root + "/v1/sessions",
        content=b"\xff\xfe{",
        timeout=30,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(r, 400, "invalid_request")
