"""The plugin's background loop: TTL expiry and noticing engine-side drops.

Contract: the loop survives every error. Each pass runs its steps
independently; a failing step is logged and counted in
``vllm_stateful:background_errors_total{task=...}``, and the next pass runs
as usual. A close racing a DELETE is not an error (close is idempotent). The loop
ends quietly once the engine is gone (shutdown, or a dead engine, which vLLM reports itself).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # duck-typed at run time, so the loop is unit-tested with fakes
    from vllm_stateful.server.service import SessionService

logger = logging.getLogger(__name__)


class Maintenance:
    def __init__(self, service: "SessionService", interval_s: float = 1.0) -> None:
        self.service = service
        self.interval_s = interval_s

    async def run(self) -> None:
        while await self.run_once(delay_s=self.interval_s):
            pass

    async def run_once(self, delay_s: float = 0.0) -> bool:
        """One pass after ``delay_s``; False when the engine is gone and the loop should end."""
        await asyncio.sleep(delay_s)
        for name, step in (("expiry", self.expire), ("kv_drops", self.notice_kv_drops)):
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _engine_gone(exc):
                    logger.info("vllm-stateful: the engine has stopped; the background loop ends")
                    return False
                logger.exception(
                    "vllm-stateful: background task %s failed; it runs again in %.0f s", name, self.interval_s
                )
                self.service.metrics.background_errors.labels(task=name).inc()
        self.service.metrics.refresh(self.service)
        return True

    async def expire(self) -> None:
        for session in self.service.store.expired(time.time()):
            # closing the ones before it took time: it may have been used since
            if session.expired(time.time()):  # failed sessions expire too
                await self.service.close(session, reason="expired")

    async def notice_kv_drops(self) -> None:
        """When an engine (a data-parallel rank) dropped pins wholesale (cache reset, weight update),
        re-read the pins of every session on it; sessions left without KV become ``cold``."""
        service = self.service
        infos = await service.bridge.call_all("info")
        service.metrics.engine_counters(infos)
        dropped = [r for r, info in enumerate(infos) if info["kv_epoch"] != service.kv_epochs[r]]
        if not dropped:
            return
        on_dropped = [s for s in service.store.all() if s.data_parallel_rank in dropped]
        seen = {s.key: s.sync_seq for s in on_dropped}
        pins: dict[str, tuple[int, int]] = {}
        for rank in dropped:
            pins.update(await service.bridge.call("pins", rank=rank))
        skipped = set()
        for session in on_dropped:
            if seen.get(session.key) != session.sync_seq or session.write_lock.locked():
                skipped.add(session.data_parallel_rank)  # work in flight: look again on the next pass
                continue
            tokens, blocks = pins.get(session.key, (0, 0))
            # kv_tokens keeps what the session should reuse, so the next request reports
            # what it had to recompute honestly
            session.pinned_blocks, session.pinned_tokens = blocks, tokens
            if session.state == "resident" and session.token_ids and not tokens:
                session.state = "cold"
        for rank in dropped:
            if rank not in skipped:
                service.kv_epochs[rank] = infos[rank]["kv_epoch"]


def _engine_gone(exc: Exception) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)
