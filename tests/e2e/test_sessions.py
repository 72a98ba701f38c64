"""Stateful sessions on the real engine: equality with stateless, zero
recomputation, block accounting, errors, concurrency."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import KEY_A, MAX_MODEL_LEN, SESSION_QUOTA, assert_error, wait_until

AUTH = {"Authorization": f"Bearer {KEY_A}"}

pytestmark = pytest.mark.e2e


def _session(server, sid: str, tokens: bool = False) -> dict:
    r = server.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"} if tokens else None)
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_session_equals_stateless_30_turns(stateful_server, client, reference):
    rng = random.Random(7)
    sid = "eq-completions"
    history: list[int] = []
    for turn in range(30):
        new = [rng.randrange(10, 3000) for _ in range(rng.randint(3, 25))]
        r = client.completions.create(
            model="tiny",
            prompt=new,
            max_tokens=6,
            temperature=0,
            extra_body={"stateful": sid, "return_token_ids": True},
        )
        got = _session(stateful_server, sid, tokens=True)["token_ids"]
        out = got[len(history) + len(new) :]
        assert got[: len(history) + len(new)] == history + new
        assert out == reference.greedy(history + new, 6), f"turn {turn}"
        s = r.model_extra["session"]
        assert s["context_tokens"] == len(history) + len(new)
        if turn > 0:
            assert s["recomputed_tokens"] == 0
            # the new tokens plus the last sampled token of the previous turn
            assert s["new_tokens"] == len(new) + 1
            assert r.usage.prompt_tokens == s["new_tokens"]
            assert r.usage.prompt_tokens_details.cached_tokens == len(history) - 1
        history = got
    assert _session(stateful_server, sid)["version"] == 30
    stateful_server.integrity()
    assert stateful_server.delete(f"/v1/sessions/{sid}").json()["deleted"] is True


def test_chat_session_equals_stateless_6_turns(stateful_server, client, tokenizer, reference):
    sid = "eq-chat"
    conversation = [{"role": "system", "content": "You plan trips."}]
    new_messages = [conversation[0], {"role": "user", "content": "Plan a weekend in Lisbon."}]
    questions = ["Cheaper hotel?", "Add a museum.", "What about food?", "Rain plan?", "Summarize."]
    for turn in range(6):
        before = _session(stateful_server, sid, tokens=True)["token_ids"] if turn else []
        r = client.chat.completions.create(
            model="tiny",
            messages=new_messages,
            max_tokens=8,
            temperature=0,
            extra_body={"stateful": sid},
        )
        conversation += new_messages[1:] if turn == 0 else new_messages
        after = _session(stateful_server, sid, tokens=True)["token_ids"]
        prompt_len = r.model_extra["session"]["context_tokens"]
        prompt, reply = after[:prompt_len], after[prompt_len:]
        assert prompt[: len(before)] == before
        # the prompt is exactly the template rendering of the whole conversation
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(prompt, skip_special_tokens=False) == rendered
        assert reply == reference.greedy(prompt, 8)
        if turn:
            assert r.model_extra["session"]["recomputed_tokens"] == 0
        assistant_text = tokenizer.decode(reply, skip_special_tokens=False).removesuffix("<|im_end|>")
        conversation.append({"role": "assistant", "content": assistant_text})
        new_messages = [{"role": "user", "content": questions[turn % len(questions)]}]
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_streaming_turn_carries_session_and_usage(stateful_server, client):
    sid = "stream-1"
    client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        extra_body={"stateful": sid},
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "more"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"stateful": sid},
        )
    )
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["session"]["version"] == 2
    usage_chunk = chunks[-1]
    assert usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.model_extra["session"]["recomputed_tokens"] == 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) > 0
    # completions stream with return_token_ids: the chunks' ids are exactly what the session appended
    history = stateful_server.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"}).json()["token_ids"]
    stream = client.completions.create(
        model="tiny",
        prompt=[5, 6],
        max_tokens=4,
        temperature=0,
        stream=True,
        extra_body={"stateful": sid, "return_token_ids": True},
    )
    streamed = [t for c in stream for ch in c.choices for t in (ch.model_extra.get("token_ids") or [])]
    after = stateful_server.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"}).json()["token_ids"]
    assert len(streamed) == 4 and after == history + [5, 6] + streamed
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_aliases_header_and_ark_field(stateful_server, client):
    client.completions.create(model="tiny", prompt="abc", max_tokens=2, extra_body={"ark_stateful": "alias-1"})
    assert _session(stateful_server, "alias-1")["version"] == 1
    r = httpx.post(
        stateful_server.base_url + "/completions",
        headers={"X-Stateful-Session": "alias-1", **AUTH},
        json={"model": "tiny", "prompt": "def", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["session"]["version"] == 2
    stateful_server.delete("/v1/sessions/alias-1")


def test_session_routes_and_block_accounting(stateful_server, client):
    baseline = stateful_server.integrity()["free_blocks"]
    created = stateful_server.post("/v1/sessions", json={"prompt": "a shared preamble " * 20})
    assert created.status_code == 201
    sid = created.json()["id"]
    assert sid.startswith("sess_") and len(sid) == 5 + 32
    assert created.json()["context_tokens"] > 0 and created.json()["version"] == 1
    assert stateful_server.post("/v1/sessions", json={"id": sid}).status_code == 409
    named = stateful_server.post(
        "/v1/sessions", json={"id": "acct-named", "messages": [{"role": "system", "content": "be brief"}]}
    ).json()
    for _ in range(3):
        client.completions.create(model="tiny", prompt=" more words", max_tokens=5, extra_body={"stateful": sid})
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=5,
            extra_body={"stateful": "acct-named"},
        )
    listed = {s["id"]: s for s in stateful_server.get("/v1/sessions").json()["data"]}
    assert {sid, "acct-named"} <= set(listed)
    body = stateful_server.integrity()
    pinned = listed[sid]["pinned_blocks"] + listed["acct-named"]["pinned_blocks"]
    assert pinned > 0 and body["free_blocks"] <= baseline - pinned
    for key in (
        "id",
        "version",
        "context_tokens",
        "pinned_blocks",
        "state",
        "created_at",
        "last_used_at",
        "ttl_s",
        "flash_queries",
    ):
        assert key in listed[sid]
    assert listed[sid]["state"] == "resident" and named["version"] == 1
    freed = stateful_server.delete(f"/v1/sessions/{sid}").json()
    assert freed["freed_blocks"] == listed[sid]["pinned_blocks"]
    stateful_server.delete("/v1/sessions/acct-named")
    after = stateful_server.integrity()
    assert after["free_blocks"] == baseline
    assert not {sid, "acct-named"} & set(after["sessions"])


def test_ttl_expiry_releases_blocks(stateful_server):
    baseline = stateful_server.integrity()["free_blocks"]
    # one request (it holds the session's write lock while it fills it: no expiry meanwhile), so
    # the session cannot expire between two of this test's requests on a machine that stops it
    r = stateful_server.post("/v1/sessions", json={"id": "short-lived", "ttl_s": 1, "prompt": list(range(100, 140))})
    assert r.status_code == 201 and r.json()["pinned_blocks"] > 0, r.text
    deadline = time.time() + 15
    while stateful_server.get("/v1/sessions/short-lived").status_code == 200 and time.time() < deadline:
        time.sleep(0.5)
    assert stateful_server.get("/v1/sessions/short-lived").status_code == 404
    assert stateful_server.integrity()["free_blocks"] == baseline


def test_errors_leave_session_unchanged(stateful_server, client):
    url = stateful_server.base_url + "/completions"
    sid = "err-1"
    client.completions.create(model="tiny", prompt="base text", max_tokens=3, extra_body={"stateful": sid})
    before = _session(stateful_server, sid, tokens=True)
    free_before = stateful_server.integrity()["free_blocks"]

    def post(body, **kw):
        return httpx.post(url, json={"model": "tiny", "max_tokens": 2, **body}, timeout=60, headers=AUTH, **kw)

    assert_error(post({"prompt": "x", "stateful": "bad id!"}), 400, "invalid_session_id")
    assert_error(post({"prompt": "x", "stateful": "a" * 129}), 400, "invalid_session_id")
    assert_error(post({"prompt": "x", "stateful": sid, "n": 2}), 400, "unsupported_in_session")
    assert_error(post({"prompt": ["a", "b"], "stateful": sid}), 400, "unsupported_in_session")
    assert_error(post({"prompt": "x", "stateful": sid, "stateful_commit": "no"}), 400, "invalid_request")
    assert_error(post({"prompt": [1, 99999], "stateful": sid}), 400, "invalid_token_id")
    assert_error(
        stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [99999]}), 400, "invalid_token_id"
    )
    assert_error(post({"prompt": "x", "stateful": "nope", "stateful_commit": False}), 404, "session_not_found")
    assert_error(stateful_server.get("/v1/sessions/nope"), 404, "session_not_found")
    assert_error(stateful_server.delete("/v1/sessions/nope"), 404, "session_not_found")
    assert_error(stateful_server.post("/v1/sessions/nope/append", json={"text": "x"}), 404, "session_not_found")
    assert_error(stateful_server.post("/v1/sessions", json={"id": "x", "bogus": 1}), 400, "invalid_request")
    assert_error(
        stateful_server.post("/v1/sessions/" + sid + "/append", json={"text": "a", "token_ids": [1]}),
        400,
        "invalid_request",
    )
    # 413: past the model's context length
    too_long = list(range(10, 10 + MAX_MODEL_LEN))
    assert_error(post({"prompt": too_long, "stateful": sid}), 413, "context_length_exceeded")
    assert_error(
        post({"prompt": [5] * 10, "stateful": sid, "max_tokens": MAX_MODEL_LEN}), 413, "context_length_exceeded"
    )
    # a refused first request does not leave an empty session behind
    assert_error(post({"prompt": too_long, "stateful": "fresh-413"}), 413, "context_length_exceeded")
    assert_error(stateful_server.get("/v1/sessions/fresh-413"), 404, "session_not_found")
    # 429: past the per-session quota, with Retry-After
    over_quota = [7] * (SESSION_QUOTA - before["context_tokens"] + 5)
    r = post({"prompt": over_quota, "stateful": sid})
    assert_error(r, 429, "session_quota_exceeded")
    assert int(r.headers["Retry-After"]) >= 1
    after = _session(stateful_server, sid, tokens=True)
    assert (after["version"], after["token_ids"], after["pinned_blocks"]) == (
        before["version"],
        before["token_ids"],
        before["pinned_blocks"],
    )
    assert stateful_server.integrity()["free_blocks"] == free_before
    stateful_server.delete(f"/v1/sessions/{sid}")


def _engine_load(server) -> int:
    b = server.integrity()
    return b["waiting"] + b["running"]


def test_second_committing_request_is_409_and_disconnect_rolls_back(stateful_server, client):
    # each attempt needs the long turn still in the engine once vLLM is paused: on a loaded machine
    # this process can be stopped while the engine finishes it (then the turn committed: a new session)
    for attempt in range(3):
        if _busy_then_disconnect(stateful_server, client, f"busy-{attempt}"):
            return
    raise AssertionError("the long turn finished before vLLM paused, 3 times")


def _busy_then_disconnect(server, client, sid: str) -> bool:
    """False (nothing asserted) when the long turn had finished before vLLM paused."""
    url = server.base_url + "/completions"
    client.completions.create(model="tiny", prompt="start", max_tokens=2, extra_body={"stateful": sid})
    before = _session(server, sid, tokens=True)
    server.idle()
    seen_first_chunk, hang_up = threading.Event(), threading.Event()

    def long_stream():
        turn = {"model": "tiny", "prompt": " long", "max_tokens": 1500, "stream": True, "stateful": sid,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", url, json=turn, timeout=60, headers=AUTH) as resp:
            for _ in resp.iter_lines():
                seen_first_chunk.set()
                hang_up.wait(60)
                break  # disconnect mid-stream

    t = threading.Thread(target=long_stream)
    t.start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        assert seen_first_chunk.wait(60)
        with server.paused():  # the turn frozen mid-generation, however slow this process is
            if _engine_load(server) == 0:
                server.delete(f"/v1/sessions/{sid}")
                return False
            r = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": 2, "stateful": sid},
                           timeout=60, headers=AUTH)  # fmt: skip
            assert_error(r, 409, "session_busy")
            # a read-only query is not a committing request: allowed concurrently
            ro = {"model": "tiny", "prompt": "q", "max_tokens": 2, "stateful": sid, "stateful_commit": False}
            query = pool.submit(httpx.post, url, json=ro, timeout=60, headers=AUTH)
            wait_until(lambda: _engine_load(server) == 2, what="read-only query admitted")
            hang_up.set()
            t.join(60)
            # the server saw the disconnect and aborted the turn (aborts run while paused)
            wait_until(lambda: _engine_load(server) == 1, what="turn aborted")
        assert query.result().status_code == 200, query.result().text
    finally:
        hang_up.set()
        t.join(60)
        pool.shutdown(wait=True)
    server.idle()
    # the handler's rollback may finish just after the engine is idle
    wait_until(lambda: _session(server, sid)["pinned_blocks"] == before["pinned_blocks"], what="rolled back")
    after = _session(server, sid, tokens=True)
    # the disconnected turn was rolled back: history, version and pinned KV as before
    assert after["token_ids"] == before["token_ids"] and after["version"] == before["version"]
    # and the session is usable, with nothing recomputed
    r = client.completions.create(model="tiny", prompt=" again", max_tokens=2, extra_body={"stateful": sid})
    assert r.model_extra["session"]["recomputed_tokens"] == 0
    server.delete(f"/v1/sessions/{sid}")
    return True


def test_delete_during_a_turn_releases_everything(stateful_server, client):
    server = stateful_server
    baseline = server.integrity()["free_blocks"]
    url = server.base_url + "/completions"
    for attempt in range(3):  # as above: the turn must still be in the engine once vLLM is paused
        sid = f"delete-mid-turn-{attempt}"
        client.completions.create(
            model="tiny", prompt=list(range(100, 400)), max_tokens=2, extra_body={"stateful": sid}
        )
        server.idle()
        turn = {"model": "tiny", "prompt": [7], "max_tokens": 1200, "ignore_eos": True, "stream": True, "stateful": sid}
        with httpx.stream("POST", url, json=turn, timeout=120, headers=AUTH) as resp:
            lines = resp.iter_lines()
            next(lines)
            with server.paused():
                finished = _engine_load(server) == 0
                if not finished:
                    deleted = server.delete(f"/v1/sessions/{sid}")
                    assert deleted.status_code == 200 and deleted.json()["freed_blocks"] > 0
            rest = [line for line in lines if line]
        if finished:
            assert server.delete(f"/v1/sessions/{sid}").status_code == 200
            continue
        # the aborted turn ends its stream with an error event, then [DONE]
        assert rest[-1] == "data: [DONE]" and '"session_not_found"' in rest[-2]
        assert server.get(f"/v1/sessions/{sid}").status_code == 404
        body = server.idle()
        assert sid not in body["sessions"] and body["free_blocks"] == baseline
        return
    raise AssertionError("the turn finished before vLLM paused, 3 times")


@pytest.mark.slow
def test_8_sessions_100_turns_concurrently(stateful_server):
    from openai import AsyncOpenAI

    baseline = stateful_server.integrity()["free_blocks"]
    aclient = AsyncOpenAI(base_url=stateful_server.base_url, api_key=KEY_A, timeout=120, max_retries=0)

    async def drive(i: int) -> tuple[str, list[int]]:
        rng = random.Random(100 + i)
        sid, expected = f"conc-{i}", []
        for _ in range(100):
            new = [rng.randrange(10, 3000) for _ in range(rng.randint(1, 6))]
            r = await aclient.completions.create(
                model="tiny",
                prompt=new,
                max_tokens=2,
                temperature=0,
                extra_body={"stateful": sid, "return_token_ids": True},
            )
            assert r.model_extra["session"]["recomputed_tokens"] == 0
            expected += new + list(r.choices[0].model_extra["token_ids"])
        return sid, expected

    async def main():
        return await asyncio.gather(*(drive(i) for i in range(8)))

    results = asyncio.run(main())
    for sid, expected in results:
        s = _session(stateful_server, sid, tokens=True)
        assert s["token_ids"] == expected and s["version"] == 100
    stateful_server.integrity()
    for sid, _ in results:
        stateful_server.delete(f"/v1/sessions/{sid}")
    assert stateful_server.integrity()["free_blocks"] == baseline


def test_metrics_expose_session_counters(stateful_server, client):
    client.completions.create(model="tiny", prompt="m", max_tokens=2, extra_body={"stateful": "metrics-1"})
    text = stateful_server.get("/metrics").text
    for name in (
        "vllm_stateful:sessions",
        "vllm_stateful:pinned_blocks",
        "vllm_stateful:turns_total",
        "vllm_stateful:recomputed_tokens_total",
        "vllm_stateful:ingest_queued_tokens",
    ):
        assert name in text, name
    stateful_server.delete("/v1/sessions/metrics-1")
