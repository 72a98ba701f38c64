"""A query's read consistency: which appends it waits for (sessions/consistency.py)."""

from __future__ import annotations

import math

import pytest

from vllm_stateful.sessions.consistency import (
    INGESTED,
    MAX_STALENESS_LIMIT_MS,
    READ_YOUR_WRITES,
    ConsistencyError,
    ReadConsistency,
)

pytestmark = pytest.mark.unit


def parse(mode, staleness=None, commit=False) -> ReadConsistency:
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
    for staleness in (None, 1000):
        with pytest.raises(ConsistencyError) as err:
            parse(INGESTED, staleness, commit=True)
        assert err.value.param == "consistency" and err.value.code == "unsupported_in_session"


@pytest.mark.parametrize("staleness", [-1, -0.5, MAX_STALENESS_LIMIT_MS + 1, math.inf, math.nan, "100", True, [5]])
def test_a_bad_bound_is_refused_on_max_staleness_ms(staleness):
    with pytest.raises(ConsistencyError) as err:
        parse(INGESTED, staleness)
    assert err.value.param == "max_staleness_ms"


def test_a_bound_needs_consistency_ingested():
    with pytest.raises(ConsistencyError) as err:
        parse(READ_YOUR_WRITES, 1000)
    assert err.value.param == "max_staleness_ms" and "ingested" in err.value.message
    assert parse(INGESTED, MAX_STALENESS_LIMIT_MS).max_staleness_s == MAX_STALENESS_LIMIT_MS / 1000
