"""What a session request sees of the appends acknowledged before it arrived (its read consistency).

* ``read_your_writes`` (the default, and always for a committing request): every append
  acknowledged before the request arrived is ingested before it reads the session.
* ``ingested`` (read-only queries): it reads what is ingested now; appends still queued are not
  waited for, and the answer says how many versions it does not see and how old the oldest of
  them is (``staleness_ms``).
* ``ingested`` with ``max_staleness_ms`` (bounded staleness, read-only queries): it waits for the
  appends acknowledged at least that long before it arrived, not for younger ones. So however far
  ingestion falls behind a feed, an answer misses at most the appends acknowledged in the last
  ``max_staleness_ms`` before it arrived (it waits instead; and those acknowledged while it waits);
  0 waits for every append acknowledged before it arrived, as read-your-writes.

Times are the API server's monotonic clock; an append re-queued after a restart or a takeover keeps
its age (its wall-clock acknowledgement time is saved with it; unknown: as old as can be). No I/O
here: the caller waits (bounded, ``wait_ingested``), and the next ingestion batch stops at the last
append a waiter needs (``server/ingest.py``; never two batches in a row), so the wait is mostly not
for younger appends behind it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

READ_YOUR_WRITES = "read_your_writes"
INGESTED = "ingested"
MODES = (READ_YOUR_WRITES, INGESTED)
MAX_STALENESS_LIMIT_MS = 86_400_000  # a day: a larger bound is a typo, not a wish
ABSENT: Any = object()  # a field the request did not give (null is given, and refused)


class ConsistencyError(ValueError):
    """A request's consistency fields are refused (a 400 on ``param``)."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class ReadConsistency:
    read_your_writes: bool = True
    max_staleness_s: float | None = None  # only without read_your_writes

    @classmethod
    def parse(cls, mode: Any, max_staleness_ms: Any, commit: bool, mode_param: str, staleness_param: str):
        """From a request's ``consistency`` and ``max_staleness_ms`` (``ABSENT``: not given); raises
        ``ConsistencyError`` for a bad value or a combination the contract above does not have."""
        if mode not in MODES:  # null too
            raise ConsistencyError(f"'{mode_param}' must be one of {list(MODES)}", mode_param)
        if commit and mode != READ_YOUR_WRITES:
            raise ConsistencyError(
                f"'{mode_param}: {INGESTED}' is for read-only queries (stateful_commit: false); a committing "
                "request always follows every acknowledged append",
                mode_param,
                "unsupported_in_session",
            )
        if max_staleness_ms is ABSENT:
            return cls(mode == READ_YOUR_WRITES)
        if mode != INGESTED:
            raise ConsistencyError(f"'{staleness_param}' needs '{mode_param}: {INGESTED}'", staleness_param)
        number = isinstance(max_staleness_ms, (int, float)) and not isinstance(max_staleness_ms, bool)
        if not number or not 0 <= max_staleness_ms <= MAX_STALENESS_LIMIT_MS:  # NaN, inf, 10**400: out of range
            raise ConsistencyError(
                f"'{staleness_param}' must be a number of milliseconds from 0 to {MAX_STALENESS_LIMIT_MS}",
                staleness_param,
            )
        return cls(False, max_staleness_ms / 1000)

    def seq_to_see(self, acked_seq: int, pending: Iterable[tuple[int, float]], now: float) -> int | None:
        """The last append sequence number the request must see before it reads (None: it waits for
        nothing). ``pending``: (sequence number, acknowledged at) of the appends acknowledged and not
        yet ingested, oldest first; ``now``: when the request arrived."""
        if self.read_your_writes:
            return acked_seq
        if self.max_staleness_s is None:
            return None
        # no early stop: times re-queued after a restart come from a wall clock that may have stepped
        cutoff = now - self.max_staleness_s
        return max((number for number, acked_at in pending if acked_at <= cutoff), default=0)


READ_ALL = ReadConsistency()  # read-your-writes


def staleness_ms(versions_behind: int, pending: Iterable[tuple[int, float]], now: float) -> int | None:
    """How long before ``now`` the oldest acknowledged append that a read at ``now`` does not see was
    acknowledged, in whole milliseconds: 0 when it sees every version (``versions_behind`` 0), None
    when that time is unknown (an append saved by an older release, or the session's creation
    content, which is not an append). ``pending`` as for ``seq_to_see``, in any order.

    With ``max_staleness_ms`` N it is at most N plus the query's wait (every append acknowledged N ms
    before it arrived is seen)."""
    if versions_behind == 0:
        return 0
    oldest = min((acked_at for _, acked_at in pending), default=None)
    if oldest is None or not math.isfinite(oldest):
        return None
    return max(0, round((now - oldest) * 1000))
