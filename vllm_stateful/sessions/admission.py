"""Cell-budget admission: refuse growth that would exceed a budget, never evict.

A "cell" is one KV token slot. Sessions pin whole blocks, so budgets are
enforced in blocks. Refusals are 429 with a Retry-After hint. No vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_stateful.engine.session_pins import cdiv
from vllm_stateful.sessions.store import SessionError

RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class Budget:
    cell_budget_tokens: int
    session_quota_tokens: int
    block_size: int

    @property
    def budget_blocks(self) -> int:
        return self.cell_budget_tokens // self.block_size


def check_growth(
    budget: Budget, pinned_blocks_total: int, session_pinned_blocks: int, session_tokens_after: int
) -> None:
    """Raise 429 if a session growing to ``session_tokens_after`` tokens would
    exceed its quota or the shared cell budget; otherwise return None."""
    if session_tokens_after > budget.session_quota_tokens:
        raise SessionError(
            429,
            f"session would hold {session_tokens_after} tokens, over its quota of {budget.session_quota_tokens}",
            "session_quota_exceeded",
            retry_after=RETRY_AFTER_S,
        )
    growth = max(0, cdiv(session_tokens_after, budget.block_size) - session_pinned_blocks)
    if pinned_blocks_total + growth > budget.budget_blocks:
        raise SessionError(
            429,
            f"cell budget exhausted: {pinned_blocks_total} of {budget.budget_blocks} blocks pinned, "
            f"this request needs {growth} more; close or let idle sessions expire",
            "cell_budget_exceeded",
            retry_after=RETRY_AFTER_S,
        )
