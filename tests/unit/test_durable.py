"""The durable store (SQLite) and the pure session-lifecycle bookkeeping: what is written is
read back whole after a reopen, a failed write leaves nothing, one process per state dir."""

from __future__ import annotations

import pytest

from vllm_stateful.sessions.admission import Budget, CellLedger
from vllm_stateful.sessions.durable import Checkpoint, DurableStore, SessionRecord, StateDirInUse
from vllm_stateful.sessions.store import Session, SessionStore

IDENTITY = {"vocabulary": "abc"}


def _scalars(**kw):
    base = dict(
        tenant="t", id="s1", ttl_s=60.0, created_at=1.0, last_used_at=2.0, version=0, committed_version=0,
        acked_seq=0, ingested_seq=0, pending_chat_text="", n_tokens=0, n_messages=0,
    )  # fmt: skip
    base.update(kw)
    return base


def _turn(store: DurableStore, key: str, tokens: list[int], before: int, version: int, **kw) -> None:
    sc = _scalars(version=version, committed_version=version, n_tokens=len(tokens), **kw)
    store.commit(key, sc, before, tokens[before:], 0, [], [Checkpoint(version, len(tokens), 0)], 0)


def test_commits_are_read_back_after_reopen(tmp_path):
    store = DurableStore(str(tmp_path), IDENTITY)
    tokens = list(range(100))
    _turn(store, "k1", tokens[:40], 0, 1)
    _turn(store, "k1", tokens[:70], 40, 2)
    store.add_append("k1", _scalars(version=3, committed_version=2, n_tokens=70, acked_seq=1), 1, {"token_ids": [5]})
    store.put_flash("k1", "fq-1", {"prompt": "x", "max_tokens": 2})
    store.close()

    again = DurableStore(str(tmp_path), IDENTITY)
    (rec,) = again.load_all()
    assert rec.key == "k1" and rec.token_ids == tokens[:70]
    assert rec.scalars["version"] == 3 and rec.scalars["committed_version"] == 2
    assert [p.version for p in rec.checkpoints] == [1, 2]
    assert rec.appends == [(1, {"token_ids": [5]})]
    assert rec.flash == [("fq-1", {"prompt": "x", "max_tokens": 2})]
    # the append is ingested: its queue entry goes in the same transaction as the tokens
    sc = _scalars(version=3, committed_version=3, n_tokens=71, acked_seq=1, ingested_seq=1)
    again.commit("k1", sc, 70, [5], 0, [], [Checkpoint(3, 71, 0)], 2, ingested_seq=1)
    (rec,) = again.load_all()
    assert rec.appends == [] and rec.token_ids == tokens[:70] + [5]
    assert [p.version for p in rec.checkpoints] == [2, 3]  # older than oldest_version=2: dropped
    again.delete("k1")
    assert again.load_all() == []
    again.close()


def test_a_failed_write_leaves_nothing_of_itself(tmp_path):
    store = DurableStore(":memory:", IDENTITY)
    _turn(store, "k1", [1, 2, 3], 0, 1)
    record = SessionRecord("k1", _scalars(version=9, n_tokens=2), [7, 8], flash=[("f", {"bad": object()})])
    with pytest.raises(TypeError):
        store.put(record)  # the flash body is not JSON: the whole rewrite rolls back
    (rec,) = store.load_all()
    assert rec.token_ids == [1, 2, 3] and rec.scalars["version"] == 1


def test_one_server_per_state_dir_and_the_same_vocabulary(tmp_path):
    store = DurableStore(str(tmp_path), IDENTITY)
    with pytest.raises(StateDirInUse):
        DurableStore(str(tmp_path), IDENTITY)
    store.close()
    with pytest.raises(ValueError, match="another setup"):
        DurableStore(str(tmp_path), {"vocabulary": "other"})


def test_rewrite_replaces_the_session_and_the_newer_incarnation_wins(tmp_path):
    store = DurableStore(":memory:", IDENTITY)
    _turn(store, "old", [1, 2], 0, 1)
    store.put(SessionRecord("new", _scalars(created_at=5.0, version=1, n_tokens=1), [9]))
    store.put(SessionRecord("new", _scalars(created_at=5.0, version=2, n_tokens=2, n_messages=1), [9, 8],
                            [{"role": "user", "content": "hi"}]))  # fmt: skip
    (rec,) = store.load_all()  # same (tenant, id): the newer incarnation
    assert rec.key == "new" and rec.token_ids == [9, 8] and rec.messages == [{"role": "user", "content": "hi"}]


def test_checkpoints_keep_a_window_and_only_prefixes():
    s = Session(id="s", tenant="t", ttl_s=1)
    for v in range(1, 8):
        s.version = v
        s.add_checkpoint(Checkpoint(v, 10 * v, 0), window=3)
    assert [p.version for p in s.checkpoints] == [4, 5, 6, 7]
    s.add_checkpoint(Checkpoint(6, 90, 0), window=3)  # an append ingested after turn 7: not a prefix
    assert [p.version for p in s.checkpoints] == [4, 5, 6, 7] and s.checkpoints[2].n_tokens == 60


def test_adopted_sessions_bypass_limits_but_not_ids():
    store = SessionStore(60, max_sessions=1)
    store.create("t", "a")
    store.adopt(Session(id="b", tenant="t", ttl_s=1))
    assert store.contains("t", "b") and len(store) == 2
    with pytest.raises(Exception, match="already exists"):
        store.adopt(Session(id="b", tenant="t", ttl_s=1))


def test_ledger_restore_force_and_spill_charges():
    budget = Budget(cell_budget_tokens=8 * 16, session_quota_tokens=10**6, block_size=16, max_model_len=4096)
    ledger = CellLedger(budget)
    assert ledger.restore("a", "t", list(range(100)))  # 7 blocks: fits
    assert ledger.committed_tokens("a") == 100 and ledger.charged_blocks() == 7
    assert not ledger.restore("c", "t", list(range(500, 540)))  # 3 more do not: uncharged until used
    assert ledger.committed_tokens("c") == 0 and ledger.charged_blocks() == 7
    with pytest.raises(Exception, match="cell budget"):
        ledger.reserve("b", 40, scope="t")
    forced = ledger.reserve("b", 40, scope="t", force=True)  # acknowledged before a restart: must run
    assert ledger.charged_blocks() == 10
    ledger.cancel(forced)
    ledger.set_committed("a", 0)  # spilled
    assert ledger.committed_tokens("a") == 0 and ledger.charged_blocks() == 0
    assert ledger.check_integrity() == []


def test_an_uncharged_session_still_counts_its_history_against_context_and_quota():
    budget = Budget(cell_budget_tokens=64 * 16, session_quota_tokens=10**6, block_size=16, max_model_len=400)
    ledger = CellLedger(budget)
    res = ledger.reserve("a", 300, scope="t")
    ledger.settle(res, 300, list(range(300)))
    ledger.uncharge("a")  # spilled: no budget charge, same history
    assert ledger.charged_blocks() == 0 and ledger.history_tokens("a") == 300
    with pytest.raises(Exception, match="context length") as err:
        ledger.reserve("a", 150, scope="t")
    assert err.value.status == 413
    ledger.recharge("a", list(range(300)))
    assert ledger.committed_tokens("a") == 300 and ledger.charged_blocks() == 19
    assert ledger.check_integrity() == []


def test_writes_after_a_close_are_refused_and_rewrites_keep_queued_appends():
    import asyncio

    from vllm_stateful.server.durability import Change, Durability

    async def scenario():
        store = DurableStore(":memory:", IDENTITY)
        durable = Durability(store)
        s = Session(id="s", tenant="t", ttl_s=60)
        await durable.commit(s, Change([1, 2, 3], [], "", 1, 1), [Checkpoint(1, 3, 0)])
        (rec,) = store.load_all()
        assert [p.version for p in rec.checkpoints] == [0, 1]  # the first write brings version 0 along

        class Item:  # an acknowledged append still queued
            seq = 4

            def body(self):
                return {"version": 2, "token_ids": [9]}

        s.pending_appends = [Item()]
        await durable.put(s)
        assert store.load_all()[0].appends == [(4, {"version": 2, "token_ids": [9]})]
        s.state = "closed"
        await durable.delete(s)
        with pytest.raises(Exception, match="was closed"):
            await durable.commit(s, Change([1, 2, 3, 4], [], "", 2, 2), [])
        assert store.load_all() == []  # a turn finishing after the close cannot bring it back

    asyncio.run(scenario())


def test_flash_answers_from_before_a_rewind_are_refused():
    import asyncio

    from vllm_stateful.sessions.flash import FlashAnswer, FlashQuery

    async def scenario():
        q = FlashQuery(None, {}, 4, None, lambda s: None, lambda n: None)
        q.record(FlashAnswer(4, 10, 100, "late", (1,), (2,), "length", 1.0))
        q.forget_after(2, 100, commit_seq=12)
        assert q.answer is None
        q.record(FlashAnswer(4, 11, 100, "evaluated before the rewind", (1,), (2,), "length", 1.0))
        assert q.answer is None
        q.record(FlashAnswer(2, 12, 100, "after", (1,), (2,), "length", 1.0))
        assert q.answer.text == "after"

    asyncio.run(scenario())


def test_an_append_saved_after_a_newer_commit_keeps_the_commits_tokens():
    store = DurableStore(":memory:", IDENTITY)
    _turn(store, "k1", [1, 2, 3], 0, 1)
    # acknowledged while that commit was being saved: its view of the session is the older one
    stale = _scalars(version=2, committed_version=0, n_tokens=0, acked_seq=1)
    store.add_append("k1", stale, 1, {"version": 2, "token_ids": [4]})
    (rec,) = store.load_all()
    assert rec.token_ids == [1, 2, 3] and rec.scalars["committed_version"] == 1
    assert rec.scalars["version"] == 2 and rec.appends == [(1, {"version": 2, "token_ids": [4]})]


def test_finish_then_cancel_completes_the_work_before_the_cancellation_goes_through():
    import asyncio

    from vllm_stateful.server.session_kv import finish_then_cancel

    done = []

    async def work():
        await asyncio.sleep(0.05)
        done.append("saved and applied")

    async def caller():
        await finish_then_cancel(work())

    async def scenario():
        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done == ["saved and applied"]

    asyncio.run(scenario())


def test_a_rewind_that_would_unshare_blocks_beyond_the_budget_is_refused_by_the_ledger():
    budget = Budget(cell_budget_tokens=2 * 16, session_quota_tokens=10**6, block_size=16, max_model_len=4096)
    ledger = CellLedger(budget)
    tokens = list(range(32))
    for key in ("parent", "child"):  # a fork: both hold the same two full blocks, charged once
        res = ledger.reserve(key, 32, known=tokens, scope="t")
        ledger.settle(res, 32, tokens)
    assert ledger.charged_blocks() == 2
    # the child back at 24 tokens: block 1 becomes its own partial block, a third one
    assert not ledger.fits_committed("child", 24, tokens[:24])
    assert ledger.charged_blocks() == 2 and ledger.check_integrity() == []
    assert ledger.fits_committed("child", 16, tokens[:16])  # still within the shared blocks


def test_a_turns_version_above_the_committed_one_survives_a_restart(tmp_path):
    """Append A3 (v3) acknowledged while turn T ran; T committed as v4 with A3 still pending, so the
    committed version stayed 2 and no rewind point was made. After a restart the re-queued A3 must
    not get a rewind point at v3: its content would hold T (v4). The row keeps the newest version
    applied, and the restored session starts from it."""
    from vllm_stateful.server.restore import session_of

    store = DurableStore(str(tmp_path), IDENTITY)
    tokens = list(range(30))
    sc = _scalars(version=4, committed_version=2, n_tokens=30, acked_seq=3, ingested_seq=2, newest_applied=4)
    store.commit("k1", sc, 0, tokens, 0, [], [Checkpoint(2, 20, 0)], 0)
    store.add_append("k1", {**sc, "version": 4}, 3, {"version": 3, "token_ids": [5]})
    store.close()
    (record,) = DurableStore(str(tmp_path), IDENTITY).load_all()
    session = session_of(record)
    assert record.scalars["newest_applied"] == 4 and session.newest_applied == 4
    older = DurableStore(str(tmp_path / "old"), IDENTITY)  # a row written without the column
    older.commit("k2", {k: v for k, v in sc.items() if k != "newest_applied"}, 0, tokens, 0, [], [], 0)
    older.close()
    (old,) = DurableStore(str(tmp_path / "old"), IDENTITY).load_all()
    assert session_of(old).newest_applied == 2  # its rewind points and committed version, as before
