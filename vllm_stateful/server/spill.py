"""Spill instead of reject (``admission: "offload"``): when the cell budget is
full, the least recently used idle sessions leave the KV pool until the new
work fits.

Contract:
* Only an idle session is spilled: no request or ingestion running or queued
  on it, its write lock free, not the session asking for room. Its tokens,
  messages and version stay; only its KV leaves (its pins are trimmed to zero
  in the engine and its budget charge drops to zero).
* Where vLLM runs a KV offloading tier (``--kv-offloading-size`` /
  ``--kv-offloading-backend``), a spilled session's full blocks were written
  there as they were computed and load back on its next request: the session
  is ``offloaded``. Without one it is ``cold`` and its next request
  re-prefills what vLLM's prefix cache no longer holds. Either way the next
  request reports what it recomputed in ``recomputed_tokens``.
* A spilled session is charged again for its whole history when it is next
  used (``SessionService.recharge``), spilling others in turn if needed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vllm_stateful.sessions.store import Session

if TYPE_CHECKING:
    from vllm_stateful.server.service import SessionService

logger = logging.getLogger(__name__)


class Spiller:
    def __init__(self, service: "SessionService", offload_tier: bool) -> None:
        self.service = service
        self.spilled_state = "offloaded" if offload_tier else "cold"

    def candidates(self, exclude: str | None, rank: int | None = None) -> list[Session]:
        """Idle sessions holding budget (on data-parallel rank ``rank``: only they free room
        there), least recently used first."""
        ledger = self.service.ledger
        assert ledger is not None
        found = [
            s
            for s in self.service.store.all()
            if s.key != exclude
            and (rank is None or s.data_parallel_rank == rank)
            and s.is_open
            and not s.busy
            and not s.write_lock.locked()
            and ledger.committed_tokens(s.key) > 0
        ]
        return sorted(found, key=lambda s: s.last_used_at)

    async def spill_one(self, exclude: str | None, rank: int | None = None) -> bool:
        """Spill the least recently used idle session (of ``rank``); False when none can leave."""
        for session in self.candidates(exclude, rank):
            if await self.spill(session):
                return True
        return False

    async def spill(self, session: Session) -> bool:
        service = self.service
        assert service.ledger is not None
        if session.write_lock.locked() or session.busy or not session.is_open:
            return False
        async with session.write_lock:
            if session.busy or not session.is_open:
                return False
            had_kv = session.pinned_tokens > 0
            info = await service.kv.sync(session, 0)
            session.note_pin(info)
            session.sync_seq += 1
            service.ledger.uncharge(session.key)
            if session.token_ids:  # a session that had no KV (restored, cold) has none offloaded either
                session.state = self.spilled_state if had_kv else "cold"
        service.metrics.spilled.inc()
        logger.debug("vllm-stateful: spilled session %s (%d tokens)", session.id, session.context_tokens)
        return True
