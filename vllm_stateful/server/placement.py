"""Which data-parallel rank holds a new session's KV.

Contract: the rank with the fewest blocks pinned by live sessions (as of
their last sync), then the fewest sessions, then the lowest index. Pure: the
API server's own view, no engine call, so placing costs nothing per request.
A session stays on its rank until it is moved (``SessionOps.move``); forks
stay on their parent's rank (they share its blocks).
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm_stateful.sessions.store import Session


def rank_loads(sessions: Iterable[Session], ranks: int) -> list[tuple[int, int]]:
    """(pinned blocks, sessions) per rank."""
    blocks, count = [0] * ranks, [0] * ranks
    for s in sessions:
        if 0 <= s.data_parallel_rank < ranks and s.is_open:
            blocks[s.data_parallel_rank] += s.pinned_blocks
            count[s.data_parallel_rank] += 1
    return list(zip(blocks, count))


def least_loaded(sessions: Iterable[Session], ranks: int) -> int:
    loads = rank_loads(sessions, ranks)
    return min(range(ranks), key=lambda r: (loads[r], r))
