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
