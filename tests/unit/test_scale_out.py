"""Scale-out bookkeeping without an engine: placement over data-parallel ranks, one cell ledger per
rank, the durable rank column (and its migration), dropping vllm-router's neutral fields, and a
session taken over from a gone replica's state dir."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from vllm_stateful.server.handoff import Handoff, _path_segment
from vllm_stateful.server.placement import least_loaded, rank_loads
from vllm_stateful.sessions.admission import Budget
from vllm_stateful.sessions.durable import DB_NAME, Checkpoint, DurableStore, StateDirInUse
from vllm_stateful.sessions.options import drop_router_defaults
from vllm_stateful.sessions.rank_ledgers import RankedLedgers
from vllm_stateful.sessions.store import Session, SessionError, SessionStore

IDENTITY = {"vocabulary": "abc"}


def test_new_sessions_go_to_the_rank_with_fewest_pinned_blocks_then_fewest_sessions():
    store = SessionStore(60.0, place=lambda live: least_loaded(live, 2))
    a = store.create("t", "a")
    b = store.create("t", "b")
    assert (a.data_parallel_rank, b.data_parallel_rank) == (0, 1)  # a tie on blocks: fewer sessions
    a.pinned_blocks = 10
    c = store.create("t", "c")
    assert c.data_parallel_rank == 1  # rank 0 pins more
    b.pinned_blocks = c.pinned_blocks = 6
    assert least_loaded(store.all(), 2) == 0 and rank_loads(store.all(), 2) == [(10, 1), (12, 2)]
    a.state = "closed"
    assert rank_loads(store.all(), 2)[0] == (0, 0)  # closed sessions do not count


def test_each_rank_has_its_own_budget_and_a_moved_account_follows_its_session():
    bs = 32
    store = SessionStore(60.0)
    sessions = {}
    for sid, rank in (("a", 0), ("b", 1), ("c", 1)):
        s = store.create("t", sid)
        s.data_parallel_rank = rank
        sessions[sid] = s

    def rank_of(key: str) -> int | None:
        s = store.by_key(key)
        return None if s is None else s.data_parallel_rank

    ledgers = RankedLedgers(Budget(10 * bs, 10 * bs, bs, 20 * bs), 2, rank_of)
    tokens = list(range(8 * bs))
    for sid in ("a", "b"):
        res = ledgers.reserve(sessions[sid].key, len(tokens), known=tokens, scope="t")
        ledgers.settle(res, len(tokens), tokens)
    # same tokens, same tenant, but different ranks: no block is shared, each rank pays 8
    assert [ledgers.charged_blocks_of_rank(r) for r in (0, 1)] == [8, 8] and ledgers.budget_blocks == 20
    with pytest.raises(SessionError) as err:  # rank 1 has 2 blocks left, whatever rank 0 has
        ledgers.reserve(sessions["c"].key, 3 * bs)
    assert err.value.status == 429
    ledgers.cancel(ledgers.reserve(sessions["c"].key, 2 * bs))  # 2 do fit

    # a moves to rank 1, where b holds the same blocks: charged there once for both, rank 0 empty
    assert ledgers.move(sessions["a"].key, 1, "t", tokens) is True
    sessions["a"].data_parallel_rank = 1
    assert [ledgers.charged_blocks_of_rank(r) for r in (0, 1)] == [0, 8]
    # c moves too, with 3 blocks of its own: they do not fit on rank 1, so it is left uncharged
    other = list(range(5000, 5000 + 3 * bs))
    assert ledgers.move(sessions["c"].key, 0, "t", other) is True  # rank 0 is empty: fits there
    assert ledgers.move(sessions["c"].key, 1, "t", other) is False
    assert ledgers.committed_tokens(sessions["c"].key) == 0 and ledgers.history_tokens(sessions["c"].key) == len(other)
    # closing b after it left the store still reaches its account on rank 1
    store.remove(sessions["b"])
    ledgers.forget(sessions["b"].key)
    assert ledgers.charged_blocks_of_rank(1) == 8  # a's blocks, now its own
    assert ledgers.check_integrity() == []


def test_the_rank_is_stored_and_an_old_state_dir_gains_the_column(tmp_path):
    db = tmp_path / DB_NAME
    con = sqlite3.connect(db)  # a state dir written before the column existed
    con.executescript(
        "CREATE TABLE sessions (key TEXT PRIMARY KEY, tenant TEXT NOT NULL, id TEXT NOT NULL, ttl_s REAL NOT NULL,"
        " created_at REAL NOT NULL, last_used_at REAL NOT NULL, version INTEGER NOT NULL,"
        " committed_version INTEGER NOT NULL, acked_seq INTEGER NOT NULL, ingested_seq INTEGER NOT NULL,"
        " pending_chat_text TEXT NOT NULL, n_tokens INTEGER NOT NULL, n_messages INTEGER NOT NULL);"
        "INSERT INTO sessions VALUES ('old', 't', 's0', 60, 1, 2, 0, 0, 0, 0, '', 0, 0);"
    )
    con.commit()
    con.close()
    store = DurableStore(str(tmp_path), IDENTITY)
    (old,) = store.load_all()
    assert old.scalars["data_parallel_rank"] == 0
    sc = {**old.scalars, "id": "s1", "version": 1, "committed_version": 1, "n_tokens": 2, "data_parallel_rank": 1}
    store.commit("new", sc, 0, [5, 6], 0, [], [Checkpoint(1, 2, 0)], 0)
    assert store.find("t", "s1").scalars["data_parallel_rank"] == 1
    assert store.find("t", "nope") is None
    store.close()


def test_router_fields_are_dropped_only_at_their_neutral_values():
    body = {"no_stop_trim": False, "include_reasoning": True, "separate_reasoning": True, "stream_reasoning": True,
            "return_hidden_states": False, "max_tokens": 3}  # fmt: skip
    drop_router_defaults(body)
    assert body == {"max_tokens": 3}
    body = {"no_stop_trim": True, "include_reasoning": 1}
    drop_router_defaults(body)
    assert body == {"no_stop_trim": True, "include_reasoning": 1}  # refused later as unsupported options


def test_a_session_is_taken_over_from_a_gone_replicas_state_dir_once(tmp_path):
    root = tmp_path / "shared"
    gone = DurableStore(str(root / "replica-b"), IDENTITY)
    sc = {"tenant": "t", "id": "s1", "ttl_s": 60.0, "created_at": 1.0, "last_used_at": 2.0, "version": 2,
          "committed_version": 2, "acked_seq": 1, "ingested_seq": 0, "pending_chat_text": "", "n_tokens": 3,
          "n_messages": 0}  # fmt: skip
    gone.commit("k1", sc, 0, [1, 2, 3], 0, [], [Checkpoint(2, 3, 0)], 0)
    gone.add_append("k1", {**sc, "version": 3}, 1, {"token_ids": [4]})
    own = DurableStore(str(root / "replica-a"), IDENTITY)
    adopted: list = []

    async def adopt(record, source):
        adopted.append((record, source))
        return Session(id=record.scalars["id"], tenant="t", ttl_s=60.0, key=record.key)

    async def unused(*_):
        raise AssertionError("no live replica here")

    handoff = Handoff(own, str(root), "http://127.0.0.1:1", adopt, unused, unused)

    async def claim(tenant, sid):
        return await handoff.claim(tenant, sid, {}, lambda: False)

    with pytest.raises(StateDirInUse):  # replica-b is alive: its store is open
        DurableStore(str(root / "replica-b"), IDENTITY)
    gone.close()  # replica-b is gone now
    assert asyncio.run(claim("other-tenant", "s1")) is False  # another tenant's id is never taken
    assert asyncio.run(claim("t", "s1")) is True
    ((record, source),) = adopted
    assert record.token_ids == [1, 2, 3] and record.appends == [(1, {"token_ids": [4]})]
    assert source == {"from": "replica", "replica": "replica-b"}
    assert own.find("t", "s1").token_ids == [1, 2, 3]  # saved here
    again = DurableStore(str(root / "replica-b"), IDENTITY)
    assert again.load_all() == []  # and gone from there: taken once
    again.close()
    assert asyncio.run(claim("t", "s1")) is False
    assert _path_segment("..") == "%2E%2E" and _path_segment("a.b") == "a.b"
    with pytest.raises(ValueError):  # a state dir outside the shared root
        Handoff(DurableStore(str(tmp_path / "elsewhere"), IDENTITY), str(root), None, adopt, unused, unused)
    own.close()
