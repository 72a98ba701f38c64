"""Tenants: each --api-key is a tenant; ids, routes, lists and prefix-cache
hits never cross tenants."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.e2e.conftest import KEY_A, KEY_B

pytestmark = pytest.mark.e2e


@pytest.fixture()
def tenants(stateful_server):
    return stateful_server.as_tenant(KEY_A), stateful_server.as_tenant(KEY_B)


def test_a_tenant_never_reaches_another_tenants_session(tenants):
    a, b = tenants
    sid = "shared-name"
    assert a.complete(sid, [11, 12, 13]).status_code == 200
    a_before = a.session(sid, tokens=True)
    # every route on A's id, as B, is a 404 -- exactly like an id nobody owns
    assert b.get(f"/v1/sessions/{sid}").status_code == 404
    assert b.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"}).status_code == 404
    assert b.post(f"/v1/sessions/{sid}/append", json={"token_ids": [1]}).status_code == 404
    assert b.delete(f"/v1/sessions/{sid}").status_code == 404
    q = b.complete(sid, [1], commit=False)
    assert q.status_code == 404 and q.json()["error"]["code"] == "session_not_found"
    assert sid not in {s["id"] for s in b.get("/v1/sessions").json()["data"]}
    # naming the same id, B creates and uses B's own session
    assert b.complete(sid, [21, 22]).status_code == 200
    b_session = b.session(sid, tokens=True)
    assert b_session["token_ids"][:2] == [21, 22] and b_session["version"] == 1
    a_after = a.session(sid, tokens=True)
    assert (a_after["token_ids"], a_after["version"]) == (a_before["token_ids"], a_before["version"])
    # each sees only its own in lists and in the debug route
    assert [s["id"] for s in a.get("/v1/sessions").json()["data"]].count(sid) == 1
    assert sid in b.integrity()["api_sessions"]
    assert b.delete(f"/v1/sessions/{sid}").status_code == 200
    assert a.session(sid)["version"] == 1  # B's delete touched only B's session
    assert a.delete(f"/v1/sessions/{sid}").status_code == 200


def test_requests_without_a_valid_key_are_refused(stateful_server):
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(stateful_server.root + "/v1/sessions", headers=headers, timeout=30)
        assert r.status_code == 401
        r = httpx.post(
            stateful_server.base_url + "/completions",
            json={"model": "tiny", "prompt": "x", "max_tokens": 1, "stateful": "nokey"},
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 401


def test_prefix_cache_hits_never_cross_tenants(tenants):
    a, b = tenants
    rng = random.Random(5)
    p1, p2 = ([rng.randrange(10, 3000) for _ in range(320)] for _ in range(2))  # 10 full blocks each
    assert a.post("/v1/sessions", json={"id": "salted-a1", "prompt": p1}).status_code == 201
    assert a.post("/v1/sessions", json={"id": "salted-a2", "prompt": p2}).status_code == 201

    def stateless_cached(server, **extra) -> int:
        r = server.post("/v1/completions", json={"model": "tiny", "prompt": p1 + [7], "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    # B's request for A's session content reuses none of A's blocks, whatever salt it names
    assert stateless_cached(b) == 0
    assert stateless_cached(b, cache_salt="default") == 0
    # A's own stateless request does reuse them (one tenant, one salt)
    assert stateless_cached(a) >= 288
    # sessions: B's session with A's content starts from nothing ...
    first = b.complete("salted-b", p2 + [7], 1).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["session"]["new_tokens"] == len(p2) + 1
    # ... while another session of A with that content shares A's blocks
    again = a.complete("salted-a3", p2 + [7], 1).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 288
    for server, sid in ((a, "salted-a1"), (a, "salted-a2"), (a, "salted-a3"), (b, "salted-b")):
        assert server.delete(f"/v1/sessions/{sid}").status_code == 200
    a.integrity()


def test_sessions_per_tenant_are_limited_and_the_limit_is_per_tenant(tenants):
    from tests.e2e.conftest import MAX_SESSIONS_PER_TENANT

    a, b = tenants
    existing = len(b.get("/v1/sessions").json()["data"])
    made = [f"limit-{i}" for i in range(MAX_SESSIONS_PER_TENANT - existing)]
    for sid in made:
        assert b.post("/v1/sessions", json={"id": sid}).status_code == 201
    over = b.post("/v1/sessions", json={"id": "limit-over"})
    assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_sessions"
    assert int(over.headers["Retry-After"]) >= 1
    turn = b.complete("limit-over-2", [1])  # creating on first use is refused the same way
    assert turn.status_code == 429 and b.get("/v1/sessions/limit-over-2").status_code == 404
    assert a.post("/v1/sessions", json={"id": "limit-a"}).status_code == 201  # tenant A is not affected
    assert a.delete("/v1/sessions/limit-a").status_code == 200
    for sid in made:
        assert b.delete(f"/v1/sessions/{sid}").status_code == 200
