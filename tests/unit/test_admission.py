"""Cell-budget admission with reservations (pure: no engine)."""

import pytest

from vllm_stateful.sessions.admission import Budget, CellLedger
from vllm_stateful.sessions.store import SessionError

pytestmark = pytest.mark.unit


def _ledger(budget_tokens=1024, quota=600, bs=32, max_len=2048) -> CellLedger:
    return CellLedger(Budget(budget_tokens, quota, bs, max_len))


def _refused(fn, status, code):
    with pytest.raises(SessionError) as e:
        fn()
    assert (e.value.status, e.value.code) == (status, code)
    return e.value


def test_default_budget_keeps_headroom_for_one_max_model_len_request():
    # 640 blocks (one is vLLM's null block), max_model_len 2048 = 64 blocks of 32
    b = Budget.for_engine(640, 32, 2048, cell_budget=None, session_quota=None)
    assert b.budget_blocks == 575 and b.session_quota_tokens == 2048
    assert 639 - b.budget_blocks >= 64
    # a big cache: 90% is below the cap
    assert Budget.for_engine(10_000, 32, 2048, None, 1000).budget_blocks == int(9_999 * 0.9)
    assert Budget.for_engine(640, 32, 2048, cell_budget=32 * 100, session_quota=None).budget_blocks == 100


def test_budget_without_room_for_the_headroom_is_refused_at_startup():
    with pytest.raises(ValueError, match="largest allowed is 18400"):
        Budget.for_engine(640, 32, 2048, cell_budget=639 * 32, session_quota=None)
    with pytest.raises(ValueError, match="cannot hold one max_model_len request"):
        Budget.for_engine(60, 32, 2048, None, None)


def test_reservations_count_against_budget_until_settled_or_cancelled():
    ledger = _ledger(budget_tokens=32 * 10)
    a = ledger.reserve("a", 32 * 6)
    assert ledger.charged_blocks() == 6
    # a second session cannot overshoot while the first one's work is in flight
    _refused(lambda: ledger.reserve("b", 32 * 5), 429, "cell_budget_exceeded")
    b = ledger.reserve("b", 32 * 4)
    assert ledger.charged_blocks() == 10 and ledger.room("b") == 0
    ledger.cancel(a)  # a's work failed: its reservation is returned
    assert ledger.charged_blocks() == 4
    ledger.settle(b, 40)  # b committed only 40 tokens: 2 blocks
    assert ledger.charged_blocks() == 2 and ledger.held_tokens("b") == 40
    ledger.cancel(b)  # settling closed it; cancelling again changes nothing
    assert ledger.charged_blocks() == 2 and ledger.check_integrity() == []
    ledger.forget("b")
    assert ledger.charged_blocks() == 0 and ledger.check_integrity() == []


def test_quota_and_context_include_work_already_accepted():
    ledger = _ledger(budget_tokens=32 * 1000, quota=600, max_len=700)
    ledger.reserve("s", 300)  # e.g. a turn in flight: 10 new tokens + 290 to generate
    _refused(lambda: ledger.reserve("s", 301), 429, "session_quota_exceeded")
    err = _refused(lambda: ledger.reserve("s", 299, context_extra=200), 413, "context_length_exceeded")
    assert "including work already accepted" in err.message
    ledger.reserve("s", 299, context_extra=1)  # fits: 599 + 1
    assert ledger.held_tokens("s") == 599


def test_check_refuses_like_reserve_without_reserving():
    ledger = _ledger(budget_tokens=32 * 2)
    _refused(lambda: ledger.check("s", 100), 429, "cell_budget_exceeded")
    assert ledger.check("s", 64) == 2 and ledger.charged_blocks() == 0


def test_room_is_what_can_still_be_reserved():
    ledger = _ledger(budget_tokens=32 * 10, quota=300)
    assert ledger.room("s") == 300
    ledger.reserve("t", 32 * 9)
    assert ledger.room("s") == 32
    r = ledger.reserve("s", 10)
    assert ledger.room("s") == 22  # the rest of its block
    ledger.settle(r, 10)
    assert ledger.room("s") == 22


def test_blocks_with_the_same_content_in_one_tenant_are_charged_once():
    ledger = _ledger(budget_tokens=32 * 13, quota=2000)
    shared = list(range(96))  # three full blocks, e.g. a system prompt
    sessions = {}
    for n in range(10):  # ten sessions of 106 tokens: 40 blocks as copies, 3 + 10 physical
        prompt = shared + [1000 + n] * 10
        res = ledger.reserve(f"s{n}", len(prompt), known=prompt, scope="tenant-a")
        sessions[f"s{n}"] = (res, prompt)
    assert ledger.charged_blocks() == 13 and ledger.check_integrity() == []
    _refused(lambda: ledger.reserve("x", 1), 429, "cell_budget_exceeded")
    for res, prompt in sessions.values():  # committed: the same blocks, now from the session's tokens
        ledger.settle(res, len(prompt), prompt)
    assert ledger.charged_blocks() == 13 and ledger.shared_blocks("s0") == 3 and ledger.charged_blocks("s0") == 4
    # closing in any order moves the shared blocks' charge to the survivors
    for n, key in enumerate(["s3", "s0", "s9", "s5", "s1", "s2", "s8", "s4", "s6"]):
        ledger.forget(key)
        assert ledger.charged_blocks() == 3 + 10 - (n + 1) and ledger.check_integrity() == []
    assert ledger.shared_blocks("s7") == 0  # the last holder: its blocks are its own again
    ledger.forget("s7")
    assert ledger.charged_blocks() == 0 and ledger.check_integrity() == []


def test_sharing_is_per_tenant_and_per_content():
    ledger = _ledger(budget_tokens=32 * 100, quota=2000)
    shared = list(range(64))
    ledger.reserve("a", 64, known=shared, scope="t1")
    assert ledger.reserve("b", 64, known=shared, scope="t1") and ledger.charged_blocks() == 2
    ledger.reserve("c", 64, known=shared, scope="t2")  # another tenant: its own copy (own cache salt)
    assert ledger.charged_blocks() == 4
    ledger.reserve("d", 64, known=[7] + shared[1:], scope="t1")  # first block differs: so do both keys
    assert ledger.charged_blocks() == 6
    # a commit that is not the reserved prompt: keys follow the committed tokens
    r = ledger.reserve("e", 70, known=shared + [1] * 6, scope="t1")
    assert ledger.charged_blocks() == 7
    ledger.settle(r, 70, [9] * 70)
    assert ledger.charged_blocks() == 9 and ledger.check_integrity() == []


def test_a_turn_extends_the_keys_of_the_committed_history():
    ledger = _ledger(budget_tokens=32 * 100, quota=2000)
    history = list(range(40))
    ledger.settle(ledger.reserve("a", 40, known=history, scope="t"), 40, history)
    assert len(ledger.block_keys("a")) == 1
    prompt = history + list(range(100, 130))  # 70 tokens: a second full block becomes known
    turn = ledger.reserve("a", 30 + 16, known=prompt, scope="t")  # + 16 to generate
    assert ledger.charged_blocks() == 3  # cdiv(86, 32)
    ledger.settle(turn, 80, prompt + [5] * 10)
    assert len(ledger.block_keys("a")) == 2 and ledger.charged_blocks() == 3
    assert ledger.check_integrity() == []


def test_only_blocks_the_engine_pins_in_full_are_shared():
    # a turn's last sampled token is not pinned: the block it starts is a private partial block in
    # the engine, so it must not be charged once for several sessions
    ledger = _ledger(budget_tokens=32 * 100, quota=2000)
    history = list(range(64))  # two full blocks of tokens, the engine pins 63 of them
    for key in ("a", "b", "c"):
        ledger.settle(ledger.reserve(key, 64, known=history[:40], scope="t"), 64, history, pinned_tokens=63)
    assert ledger.charged_blocks() == 1 + 3 and ledger.check_integrity() == []
    assert ledger.shared_blocks("a") == 1


def test_overlapping_reservations_and_commits_count_a_content_once_per_session():
    ledger = _ledger(budget_tokens=32 * 100, quota=4000)
    prompt = list(range(128))
    turn = ledger.reserve("a", 128, known=prompt, scope="t")  # keys for 4 blocks, still open
    ledger.settle(ledger.reserve("a", 128), 128, prompt)  # an append over the same positions settles first
    # 256 tokens held (128 committed + the turn's 128): 8 blocks, the 4 keyed ones counted once
    assert ledger.charged_blocks() == 8 and ledger.check_integrity() == []
    ledger.cancel(turn)
    assert ledger.charged_blocks() == 4 and ledger.check_integrity() == []
    # a reservation whose known content runs past what it reserves never drives a total negative
    ledger.reserve("b", 0, known=list(range(500, 756)), scope="t")
    assert ledger.charged_blocks() >= 4 and ledger.check_integrity() == []
