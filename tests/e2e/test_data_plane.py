"""Data plane: appends ingested in order, read-only queries, back-pressure."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.e2e.conftest import INGEST_QUEUE_TOKENS, KEY_A, wait_until

AUTH = {"Authorization": f"Bearer {KEY_A}"}

pytestmark = pytest.mark.e2e


def _tokens(server, sid):
    r = server.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"})
    assert r.status_code == 200, r.text
    return r.json()


def test_appends_equal_concatenation_and_wait_semantics(stateful_server, tokenizer):
    sid = "dp-concat"
    assert stateful_server.post("/v1/sessions", json={"id": sid}).status_code == 201
    texts = [f"09:30:{i:02d} BTC {64000 + i * 7}.5 +0.{i}%\n" for i in range(12)]
    versions = []
    for text in texts:
        r = stateful_server.post(f"/v1/sessions/{sid}/append", json={"text": text})
        assert r.status_code == 202, r.text
        versions.append(r.json()["version"])
    assert versions == list(range(1, 13))
    r = stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [11, 12, 13], "wait": True})
    assert r.status_code == 200 and r.json()["version"] == 13 and r.json()["queued_tokens"] == 0
    expected = [t for text in texts for t in tokenizer.encode(text)] + [11, 12, 13]
    assert _tokens(stateful_server, sid)["token_ids"] == expected
    stateful_server.integrity()
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_query_equals_stateless_and_leaves_no_trace(stateful_server, client, reference):
    sid = "dp-query"
    stateful_server.post("/v1/sessions", json={"id": sid})
    # 70 tokens: the session's last block (size 32) is partial, and queries share it
    stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": list(range(100, 170)), "wait": True})
    before = _tokens(stateful_server, sid)
    free_before = stateful_server.integrity()["free_blocks"]
    for question in ([5, 6, 7], [8, 9], [5, 6, 7]):
        r = client.completions.create(
            model="tiny",
            prompt=question,
            max_tokens=6,
            temperature=0,
            extra_body={"stateful": sid, "stateful_commit": False, "return_token_ids": True},
        )
        assert r.model_extra["session"]["recomputed_tokens"] == 0
        assert r.model_extra["session"]["new_tokens"] == len(question)
        assert r.choices[0].model_extra["token_ids"] == reference.greedy(before["token_ids"] + question, 6)
        after = _tokens(stateful_server, sid)
        assert (after["token_ids"], after["version"], after["pinned_blocks"]) == (
            before["token_ids"],
            before["version"],
            before["pinned_blocks"],
        )
    # a commit after queries still sees the untouched partial block: same as stateless
    r = client.completions.create(
        model="tiny", prompt=[8, 9], max_tokens=6, temperature=0, extra_body={"stateful": sid, "return_token_ids": True}
    )
    assert r.choices[0].model_extra["token_ids"] == reference.greedy(before["token_ids"] + [8, 9], 6)
    assert stateful_server.integrity()["free_blocks"] <= free_before
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_concurrent_appends_ingest_in_acknowledgement_order(stateful_server):
    sid = "dp-order"
    stateful_server.post("/v1/sessions", json={"id": sid})

    def send(i):
        r = httpx.post(
            f"{stateful_server.base_url}/sessions/{sid}/append",
            json={"token_ids": [1000 + i, 2000 + i]},
            timeout=60,
            headers=AUTH,
        )
        assert r.status_code == 202, r.text
        return r.json()["version"], i

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        acks = sorted(pool.map(send, range(40)))
    assert [v for v, _ in acks] == list(range(1, 41))
    # a query waits for every append acknowledged before it (read-your-writes)
    q = httpx.post(
        f"{stateful_server.base_url}/completions",
        timeout=60,
        headers=AUTH,
        json={"model": "tiny", "prompt": [1], "max_tokens": 1, "stateful": sid, "stateful_commit": False},
    )
    assert q.json()["session"]["context_tokens"] == 80 + 1
    expected = [t for _, i in acks for t in (1000 + i, 2000 + i)]
    assert _tokens(stateful_server, sid)["token_ids"] == expected
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_an_append_while_the_creation_content_is_filled_is_refused_and_the_versions_stay_in_order(stateful_server):
    server, sid = stateful_server, "dp-filling"
    prompt = list(range(300, 400))
    server.idle()  # nothing of earlier tests in the engine: the count below is this creation's
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with server.paused():  # the content is admitted and cannot be prefilled yet, on any machine
            created = pool.submit(server.post, "/v1/sessions", json={"id": sid, "prompt": prompt})
            wait_until(lambda: (b := server.integrity())["waiting"] + b["running"] == 1, what="content admitted")
            r = server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [7, 8, 9]})
            # refused until the create is answered (one landing while the content was still being
            # tokenized took version 1, ahead of the content's 2; here, where it would have been 2, a 202)
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy", r.text
            assert float(r.headers["retry-after"]) > 0
            r = server.post(f"/v1/sessions/{sid}/fork", json={"id": sid + "-child"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy", r.text
        assert created.result().status_code == 201, created.result().text
    finally:
        pool.shutdown(wait=True)
    body = _tokens(server, sid)
    assert body["version"] == 1 and body["token_ids"] == prompt  # the refused append left no trace
    r = server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [7, 8, 9], "wait": True})
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    assert _tokens(server, sid)["token_ids"] == prompt + [7, 8, 9]
    assert server.delete(f"/v1/sessions/{sid}").status_code == 200


def test_back_pressure_429_and_nothing_dropped(stateful_server):
    sid = "dp-pressure"
    stateful_server.post("/v1/sessions", json={"id": sid, "prompt": [5]})
    chunk = list(range(300, 300 + INGEST_QUEUE_TOKENS // 4))

    def send(i):
        return i, httpx.post(
            f"{stateful_server.base_url}/sessions/{sid}/append",
            json={"token_ids": [3300 + i] + chunk},
            timeout=60,
            headers=AUTH,
        )

    # a turn holds the session, so nothing drains while the appends arrive
    turn = {"model": "tiny", "prompt": [6], "max_tokens": 300, "ignore_eos": True, "stateful": sid}
    with stateful_server.held_request("/v1/completions", turn) as held:
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(send, range(10)))  # 10 x 129 tokens stays under the session quota
    assert held.result().status_code == 200
    accepted, refused = [], 0
    for i, r in replies:
        if r.status_code == 202:
            accepted.append((r.json()["version"], i))
        else:
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "ingest_queue_full" and int(r.headers["Retry-After"]) >= 1
            refused += 1
    assert len(accepted) == INGEST_QUEUE_TOKENS // (len(chunk) + 1) and refused == 10 - len(accepted)
    stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [1], "wait": True})
    appended = [t for _, i in sorted(accepted) for t in [3300 + i] + chunk] + [1]
    body = _tokens(stateful_server, sid)
    # the session, then the turn (its prompt and 300 generated tokens), then every accepted append in order
    assert body["token_ids"][:2] == [5, 6] and body["token_ids"][302:] == appended
    assert body["version"] == 2 + len(accepted) + 1
    stateful_server.delete(f"/v1/sessions/{sid}")
    deadline = time.time() + 5
    while stateful_server.get(f"/v1/sessions/{sid}").status_code != 404 and time.time() < deadline:
        time.sleep(0.1)


def _metric(server, name: str) -> float:
    import re

    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", server.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_appends_queued_behind_a_turn_are_coalesced_into_one_prefill(stateful_server):
    sid = "dp-coalesce"
    stateful_server.post("/v1/sessions", json={"id": sid, "prompt": [40, 41, 42]})
    batches_before = _metric(stateful_server, "vllm_stateful:ingest_batches_total")
    turn = {"model": "tiny", "prompt": [50], "max_tokens": 400, "ignore_eos": True, "stateful": sid}
    with stateful_server.held_request("/v1/completions", turn) as held:  # the turn holds the session
        acks = [stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [60 + i]}) for i in range(10)]
        assert [a.status_code for a in acks] == [202] * 10
    assert held.result().status_code == 200
    stateful_server.post(f"/v1/sessions/{sid}/append", json={"token_ids": [99], "wait": True})
    body = _tokens(stateful_server, sid)
    # the turn (prompt + 400 generated) committed first, then the ten appends in order, then the last
    assert body["token_ids"][:4] == [40, 41, 42, 50] and len(body["token_ids"]) == 4 + 400 + 11
    assert body["token_ids"][-11:] == [60 + i for i in range(10)] + [99]
    # one prefill for the ten queued appends, one for the last
    assert _metric(stateful_server, "vllm_stateful:ingest_batches_total") - batches_before == 2
    stateful_server.delete(f"/v1/sessions/{sid}")


def test_ingested_consistency_answers_now_and_says_how_far_behind(stateful_server, reference):
    """``consistency: "ingested"``: a read-only query does not wait for acknowledged appends; it
    answers over what is ingested and reports that version and how many it does not see. The
    default (read-your-writes) waits and sees them."""
    server = stateful_server
    sid = "dp-consistency"
    history = server.fresh_session(sid, 64, seed=21)
    extra, question = list(range(500, 540)), [901, 902, 903]

    def query(**fields) -> httpx.Response:
        return server.complete(sid, question, 3, commit=False, **fields)

    server.idle()  # nothing left of earlier tests in the engine: the count below is this test's requests
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with server.paused():  # the append is acknowledged but cannot be ingested yet
            sent = time.monotonic()
            r = server.post(f"/v1/sessions/{sid}/append", json={"token_ids": extra})
            assert r.status_code == 202 and r.json()["version"] == 2, r.text
            time.sleep(0.3)  # the append is at least 300 ms old when the query reads (not a speed assumption)
            now = pool.submit(query, consistency="ingested")
            # the query reached the engine beside the ingestion: it did not wait for it
            wait_until(lambda: (b := server.integrity())["waiting"] + b["running"] >= 2, what="query admitted")
        answer = now.result()
        since_sent_ms = (time.monotonic() - sent) * 1000
    finally:
        pool.shutdown(wait=True)
    assert answer.status_code == 200, answer.text
    s = answer.json()["session"]
    assert s["version"] == 1 and s["versions_behind"] == 1 and s["context_tokens"] == len(history) + len(question)
    # the append it missed was acknowledged after it was sent, and read before the answer came back
    assert 300 <= s["staleness_ms"] <= since_sent_ms + 1
    assert answer.json()["choices"][0]["token_ids"] == reference.greedy(history + question, 3)

    waited = query()  # read-your-writes: sees the append
    assert waited.status_code == 200, waited.text
    s = waited.json()["session"]
    assert s["version"] == 2 and "versions_behind" not in s and "staleness_ms" not in s
    assert s["context_tokens"] == len(history) + len(extra) + len(question)
    assert waited.json()["choices"][0]["token_ids"] == reference.greedy(history + extra + question, 3)

    for bad in ("eventual", 1, None):
        body = {"model": "tiny", "prompt": question, "max_tokens": 1, "stateful": sid, "stateful_commit": False}
        r = server.post("/v1/completions", json={**body, "consistency": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "consistency", r.text
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": question, "max_tokens": 1, "stateful": sid,
                                             "consistency": "ingested"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_in_session", r.text
    assert server.session(sid)["version"] == 2  # refusals changed nothing
    assert server.delete(f"/v1/sessions/{sid}").status_code == 200


def test_bounded_staleness_waits_only_for_appends_older_than_its_bound(stateful_server, reference):
    """``max_staleness_ms`` with ``consistency: "ingested"``: a read-only query waits for the appends
    acknowledged at least that long before it arrived, and for no others. The bounds decide by the
    order of events, not by the machine's speed: 0 (the append was acknowledged before the query)
    and ten minutes (it was not acknowledged that long ago)."""
    server = stateful_server
    sid = "dp-staleness"
    history = server.fresh_session(sid, 64, seed=22)
    extra, question = list(range(600, 630)), [905, 906, 907]

    def query(**fields) -> httpx.Response:
        return server.complete(sid, question, 3, commit=False, **fields)

    server.idle()  # nothing left of earlier tests in the engine: the counts below are this test's
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        with server.paused():  # the append is acknowledged but cannot be ingested yet
            sent = time.monotonic()
            r = server.post(f"/v1/sessions/{sid}/append", json={"token_ids": extra})
            assert r.status_code == 202 and r.json()["version"] == 2, r.text
            strict = pool.submit(query, consistency="ingested", max_staleness_ms=0)
            wait_until(lambda: server.integrity()["ingest_waiters"].get(sid) == 1, what="strict query waiting")
            loose = pool.submit(query, consistency="ingested", max_staleness_ms=600_000)
            # the loose query reached the engine beside the ingestion; the strict one still waits for it
            wait_until(lambda: (b := server.integrity())["waiting"] + b["running"] >= 2, what="loose query admitted")
            assert server.integrity()["ingest_waiters"].get(sid) == 1 and not strict.done()
        answers = {"loose": loose.result(), "strict": strict.result()}
        since_sent_ms = (time.monotonic() - sent) * 1000
    finally:
        pool.shutdown(wait=True)
    for name, answer in answers.items():
        assert answer.status_code == 200, (name, answer.text)
    s = answers["loose"].json()["session"]
    assert s["version"] == 1 and s["versions_behind"] == 1 and s["context_tokens"] == len(history) + len(question)
    assert answers["loose"].json()["choices"][0]["token_ids"] == reference.greedy(history + question, 3)
    assert 0 <= s["staleness_ms"] <= since_sent_ms + 1
    s = answers["strict"].json()["session"]
    assert s["version"] == 2 and s["versions_behind"] == 0 and s["staleness_ms"] == 0
    assert s["context_tokens"] == len(history) + len(extra) + len(question)
    assert answers["strict"].json()["choices"][0]["token_ids"] == reference.greedy(history + extra + question, 3)

    # nor for younger appends queued behind the ones it needs: the next batch stops at the last one a
    # waiter needs (appends acknowledged after the query arrived are ingested in a later batch)
    first, second, third = list(range(700, 710)), list(range(710, 720)), list(range(720, 730))
    server.idle()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with server.paused():
            assert server.post(f"/v1/sessions/{sid}/append", json={"token_ids": first}).status_code == 202
            wait_until(lambda: (b := server.integrity())["waiting"] + b["running"] == 1, what="first batch sent")
            assert server.post(f"/v1/sessions/{sid}/append", json={"token_ids": second}).status_code == 202
            strict = pool.submit(query, consistency="ingested", max_staleness_ms=0)
            wait_until(lambda: server.integrity()["ingest_waiters"].get(sid) == 1, what="strict query waiting")
            sent = time.monotonic()
            r = server.post(f"/v1/sessions/{sid}/append", json={"token_ids": third})
            assert r.status_code == 202 and r.json()["version"] == 5, r.text
        answer = strict.result()
        since_sent_ms = (time.monotonic() - sent) * 1000
    finally:
        pool.shutdown(wait=True)
    assert answer.status_code == 200, answer.text
    s = answer.json()["session"]
    seen = history + extra + first + second
    assert s["version"] == 4 and s["versions_behind"] == 1 and s["context_tokens"] == len(seen) + len(question)
    assert 0 <= s["staleness_ms"] <= since_sent_ms + 1  # the one it missed: the third, acknowledged while it waited
    assert answer.json()["choices"][0]["token_ids"] == reference.greedy(seen + question, 3)
    server.idle()
    assert server.session(sid, tokens=True)["token_ids"] == seen + third  # the rest is ingested after it

    for bad in ({"max_staleness_ms": 1000}, {"consistency": "read_your_writes", "max_staleness_ms": 1000},
                {"consistency": "ingested", "max_staleness_ms": -1},
                {"consistency": "ingested", "max_staleness_ms": "1000"}):  # fmt: skip
        r = query(**bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_staleness_ms", (bad, r.text)
    r = query(consistency="ingested", max_staleness_ms=1000, stateful_commit=True)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_in_session", r.text
    assert server.session(sid)["version"] == 5  # refusals changed nothing
    assert server.delete(f"/v1/sessions/{sid}").status_code == 200
