"""A query's read consistency: which appends it waits for (sessions/consistency.py), and the
ingestion batches and saved appends that make the wait exact (server/ingest.py)."""

from __future__ import annotations

import math

import pytest

from vllm_stateful.server.ingest import ACKED_UNIX_KEY, AppendItem, acked_at_from, next_batch, settled_version
from vllm_stateful.sessions.admission import Reservation
from vllm_stateful.sessions.consistency import (
    ABSENT,
    INGESTED,
    MAX_STALENESS_LIMIT_MS,
    READ_YOUR_WRITES,
    ConsistencyError,
    ReadConsistency,
    staleness_ms,
)
from vllm_stateful.sessions.store import Session

pytestmark = pytest.mark.unit


def parse(mode, staleness=ABSENT, commit=False) -> ReadConsistency:
    return ReadConsistency.parse(mode, staleness, commit, "consistency", "max_staleness_ms")


# appends 4..7 acknowledged at t = 10, 20, 30, 40 s and not ingested yet (1..3 are)
PENDING = [(4, 10.0), (5, 20.0), (6, 30.0), (7, 40.0)]


def test_read_your_writes_waits_for_every_acknowledged_append():
    assert parse(READ_YOUR_WRITES).seq_to_see(7, PENDING, now=41.0) == 7
    assert parse(READ_YOUR_WRITES, commit=True).seq_to_see(7, [], now=41.0) == 7


def test_ingested_waits_for_nothing():
    assert parse(INGESTED).seq_to_see(7, PENDING, now=41.0) is None


def test_bounded_staleness_waits_for_the_appends_older_than_the_bound_only():
    fifteen = parse(INGESTED, 15_000)
    assert fifteen.max_staleness_s == 15.0
    assert fifteen.seq_to_see(7, PENDING, now=41.0) == 5  # 4 (31 s old), 5 (21 s); not 6 (11 s), 7
    assert fifteen.seq_to_see(7, PENDING, now=35.0) == 5  # 5 is exactly 15 s old: waited for
    assert fifteen.seq_to_see(7, PENDING, now=24.0) == 0  # nothing old enough: no wait (0 is ingested)
    assert fifteen.seq_to_see(7, [], now=99.0) == 0  # everything ingested
    assert parse(INGESTED, 0).seq_to_see(7, PENDING, now=41.0) == 7  # 0: every append acknowledged before it
    assert parse(INGESTED, 2.5).max_staleness_s == 0.0025  # fractions of a millisecond are kept


@pytest.mark.parametrize("mode", ["eventual", None, 1, True, [INGESTED], {"mode": INGESTED}])
def test_an_unknown_mode_is_refused_on_consistency(mode):
    with pytest.raises(ConsistencyError) as err:
        parse(mode)
    assert err.value.param == "consistency" and err.value.code is None


def test_a_committing_request_cannot_read_behind():
    for staleness in (ABSENT, 1000):
        with pytest.raises(ConsistencyError) as err:
            parse(INGESTED, staleness, commit=True)
        assert err.value.param == "consistency" and err.value.code == "unsupported_in_session"


@pytest.mark.parametrize(
    "staleness", [-1, -0.5, MAX_STALENESS_LIMIT_MS + 1, 10**400, math.inf, math.nan, "100", True, [5], None]
)
def test_a_bad_bound_is_refused_on_max_staleness_ms(staleness):
    with pytest.raises(ConsistencyError) as err:
        parse(INGESTED, staleness)
    assert err.value.param == "max_staleness_ms"


def test_a_bound_needs_consistency_ingested():
    for staleness in (1000, None):
        with pytest.raises(ConsistencyError) as err:
            parse(READ_YOUR_WRITES, staleness)
        assert err.value.param == "max_staleness_ms" and "ingested" in err.value.message
    assert parse(INGESTED, MAX_STALENESS_LIMIT_MS).max_staleness_s == MAX_STALENESS_LIMIT_MS / 1000


def _item(seq: int, acked_unix: float = 0.0) -> AppendItem:
    return AppendItem(seq, seq, 0.0, Reservation("k", 1), token_ids=[seq], acked_unix=acked_unix)


def test_a_batch_stops_at_the_last_append_a_waiter_needs():
    queued = [_item(s) for s in (4, 5, 6, 7)]
    whole = next_batch(queued, [])
    assert [i.seq for i in whole[0]] == [4, 5, 6, 7] and whole[1] == []  # nobody waits: one batch
    batch, rest = next_batch(queued, [5, 4])  # a bounded query needs 5, another 4
    assert [i.seq for i in batch] == [4, 5] and [i.seq for i in rest] == [6, 7]
    batch, rest = next_batch(queued, [3])  # needs only what is ingested already: the whole queue
    assert len(batch) == 4 and rest == []
    assert next_batch(queued, [7, 5])[1] == []  # read-your-writes waits for all of it
    # never two batches short in a row: else queries arriving during each batch keep it short
    assert next_batch(queued, [5], may_stop_short=False) == (queued, [])


def test_a_batch_that_leaves_appends_queued_settles_the_version_below_the_oldest():
    # a turn committed as v6 while appends 5 (v5) and 7 (v7) waited: ingesting 5 leaves 7 queued
    assert settled_version([AppendItem(7, 7, 0.0, Reservation("k", 1), token_ids=[7])]) == 6  # v6 (the turn) in
    assert settled_version([]) is None  # nothing queued: the session's current version


def test_a_saved_append_keeps_its_age_across_a_restart():
    saved = _item(4, acked_unix=1000.5).body()
    assert saved[ACKED_UNIX_KEY] == 1000.5 and saved["token_ids"] == [4]
    assert ACKED_UNIX_KEY not in _item(4, acked_unix=-math.inf).body()  # unknown: not written as -Infinity
    # re-queued 30 s after it was acknowledged: 30 s old on this process's monotonic clock
    assert acked_at_from(1000.0, now=50.0, now_unix=1030.0) == 20.0
    assert acked_at_from(1100.0, now=50.0, now_unix=1030.0) == 50.0  # the wall clock stepped back: now
    assert acked_at_from(-math.inf, now=50.0, now_unix=1030.0) == -math.inf  # unknown: as old as can be
    assert parse(INGESTED, 10_000).seq_to_see(5, [(4, -math.inf), (5, 49.0)], now=50.0) == 4


def test_times_out_of_order_after_a_restart_do_not_hide_an_old_append():
    # 6 was saved with a wall-clock time later than 7's (the clock stepped back between them)
    pending = [(5, 10.0), (6, 45.0), (7, 20.0)]
    assert parse(INGESTED, 15_000).seq_to_see(7, pending, now=41.0) == 7  # 7 is 21 s old: 5, 6, 7


def test_staleness_is_the_age_of_the_oldest_append_not_seen():
    assert staleness_ms(0, [], now=50.0) == 0  # it sees every acknowledged append
    assert staleness_ms(2, [(5, 48.5), (6, 49.9)], now=50.0) == 1500
    assert staleness_ms(2, [(6, 45.0), (7, 20.0)], now=50.0) == 30_000  # out of order after a restart
    assert staleness_ms(2, [(4, -math.inf), (5, 49.0)], now=50.0) is None  # saved by an older release
    assert staleness_ms(1, [(5, 50.2)], now=50.0) == 0  # acknowledged after the read's clock reading
    # an applied batch whose entries are not yet trimmed, and the creation content (not an append)
    assert staleness_ms(0, [(5, 42.0)], now=50.0) == 0 and staleness_ms(1, [], now=50.0) is None


def test_applied_appends_stop_counting_as_missed_at_once():
    """``ingest`` marks a batch's appends ingested where it applies them (the drain's own
    bookkeeping comes loop iterations later): a read in between must not count them as missed."""
    s = Session(id="s", tenant="t", ttl_s=1)
    s.uningested_acks.extend([(3, 10.0), (4, 11.0), (5, 12.0)])
    s.appends_ingested(4)
    assert list(s.uningested_acks) == [(5, 12.0)] and s.ingested_seq == 4
    s.appends_ingested(2)  # the drain's later, older report changes nothing
    assert list(s.uningested_acks) == [(5, 12.0)] and s.ingested_seq == 4
