"""Cell-budget admission with reservations: refuse growth that could exceed a
budget, never evict.

A "cell" is one KV token slot; sessions pin whole blocks, so budgets are
enforced in blocks. Every piece of work that can grow a session (a committing
turn, an acknowledged append) *reserves* its tokens before it starts; the
reservation is settled into the session's committed tokens when the work
commits, or cancelled when it fails. A session is charged for
``cdiv(committed + reserved, block_size)`` blocks, and admission checks the
sum of all charges, so concurrent requests cannot overshoot the budget
together, and acknowledged work never fails a budget check later.

Refusals are ``SessionError``: 429 (quota, budget, with Retry-After) or 413
(model context). No vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_stateful.engine.session_pins import cdiv
from vllm_stateful.sessions.store import SessionError

RETRY_AFTER_S = 1.0
DEFAULT_BUDGET_FRACTION = 0.9


@dataclass(frozen=True)
class Budget:
    cell_budget_tokens: int
    session_quota_tokens: int
    block_size: int
    max_model_len: int

    @property
    def budget_blocks(self) -> int:
        return self.cell_budget_tokens // self.block_size

    @classmethod
    def for_engine(
        cls,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        cell_budget: int | None,
        session_quota: int | None,
    ) -> "Budget":
        """The budget for an engine with ``num_blocks`` KV blocks (one is vLLM's null block).

        Headroom: whatever sessions pin, one request of ``max_model_len`` tokens
        (a stateless request, or a session request's private blocks) must still
        fit, or vLLM could stall with nothing running. So the budget is at most
        ``num_blocks - 1 - cdiv(max_model_len, block_size)`` blocks; the default
        is 90% of the cache within that cap. A configured budget above the cap
        is refused (ValueError), never silently lowered.
        """
        usable = num_blocks - 1
        headroom = cdiv(max_model_len, block_size)
        cap_blocks = usable - headroom
        if cap_blocks <= 0:
            raise ValueError(
                f"the KV cache ({usable} blocks of {block_size} tokens) cannot hold one max_model_len request "
                f"({headroom} blocks) beside any pinned session; give vLLM more KV cache or lower --max-model-len"
            )
        if cell_budget is None:
            budget_blocks = min(int(usable * DEFAULT_BUDGET_FRACTION), cap_blocks)
        else:
            budget_blocks = cell_budget // block_size
            if budget_blocks > cap_blocks:
                raise ValueError(
                    f"stateful.cell_budget={cell_budget} tokens leaves no room for one max_model_len request "
                    f"({max_model_len} tokens) in a KV cache of {usable * block_size} tokens; "
                    f"the largest allowed is {cap_blocks * block_size}"
                )
            if budget_blocks <= 0:
                raise ValueError(f"stateful.cell_budget={cell_budget} is smaller than one block ({block_size})")
        return cls(
            cell_budget_tokens=budget_blocks * block_size,
            session_quota_tokens=session_quota or max_model_len,
            block_size=block_size,
            max_model_len=max_model_len,
        )


@dataclass
class Reservation:
    """Tokens one piece of work may add to a session, held until settled or cancelled."""

    key: str
    tokens: int
    open: bool = True


@dataclass
class _Account:
    committed: int = 0
    reserved: int = 0
    reservations: list[Reservation] = field(default_factory=list)


class CellLedger:
    """Committed and reserved tokens per session (keyed by incarnation key)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._accounts: dict[str, _Account] = {}
        self._charged_blocks = 0

    # --- reading ---------------------------------------------------------------

    def held_tokens(self, key: str) -> int:
        """Committed plus reserved tokens of one session."""
        acct = self._accounts.get(key)
        return 0 if acct is None else acct.committed + acct.reserved

    def charged_blocks(self, key: str | None = None) -> int:
        """Blocks charged to one session, or to all of them."""
        if key is None:
            return self._charged_blocks
        return cdiv(self.held_tokens(key), self.budget.block_size)

    def room(self, key: str) -> int:
        """Most tokens ``key`` could still reserve under its quota and the budget."""
        held = self.held_tokens(key)
        quota_room = self.budget.session_quota_tokens - held
        free_blocks = self.budget.budget_blocks - self._charged_blocks
        own = self.charged_blocks(key)
        budget_room = (own + free_blocks) * self.budget.block_size - held
        return max(0, min(quota_room, budget_room, self.budget.max_model_len - held))

    # --- changing ---------------------------------------------------------------

    def reserve(self, key: str, tokens: int, context_extra: int = 0, what: str = "this request") -> Reservation:
        """Reserve ``tokens`` for ``key``, or raise 413 / 429 and change nothing.

        ``context_extra``: tokens the work needs in the model's context beyond
        what it keeps (e.g. the one token an ingestion prefill samples).
        """
        tokens = max(0, int(tokens))
        growth = self.check(key, tokens, context_extra, what)
        acct = self._accounts.setdefault(key, _Account())
        res = Reservation(key, tokens)
        acct.reserved += tokens
        acct.reservations.append(res)
        self._charged_blocks += growth
        return res

    def check(self, key: str, tokens: int, context_extra: int = 0, what: str = "this request") -> int:
        """Raise 413 / 429 as ``reserve`` would, without reserving; returns the blocks it would add."""
        held_before = self.held_tokens(key)
        held_after = held_before + tokens
        if held_after + context_extra > self.budget.max_model_len:
            raise SessionError(
                413,
                f"{what} would take the session to {held_after + context_extra} tokens (including work already "
                f"accepted on it), over the model's context length of {self.budget.max_model_len}; "
                "the session is unchanged",
                "context_length_exceeded",
            )
        if held_after > self.budget.session_quota_tokens:
            raise SessionError(
                429,
                f"session would hold {held_after} tokens, over its quota of {self.budget.session_quota_tokens}",
                "session_quota_exceeded",
                retry_after=RETRY_AFTER_S,
            )
        bs = self.budget.block_size
        growth = cdiv(held_after, bs) - cdiv(held_before, bs)
        if growth > 0 and self._charged_blocks + growth > self.budget.budget_blocks:
            raise SessionError(
                429,
                f"cell budget exhausted: {self._charged_blocks} of {self.budget.budget_blocks} blocks pinned or "
                f"reserved, {what} needs {growth} more; close sessions or let idle ones expire",
                "cell_budget_exceeded",
                retry_after=RETRY_AFTER_S,
            )
        return growth

    def settle(self, res: Reservation, committed_tokens: int) -> None:
        """End ``res``; the session now holds ``committed_tokens`` committed tokens."""
        self._close(res)
        self.set_committed(res.key, committed_tokens)

    def cancel(self, res: Reservation) -> None:
        """End ``res`` without committing anything (idempotent)."""
        self._close(res)

    def set_committed(self, key: str, committed_tokens: int) -> None:
        acct = self._accounts.get(key)
        if acct is None:
            return
        self._recharge(key, lambda: setattr(acct, "committed", max(0, committed_tokens)))

    def forget(self, key: str) -> None:
        """The session is gone: drop its account and every reservation on it."""
        acct = self._accounts.pop(key, None)
        if acct is None:
            return
        for res in acct.reservations:
            res.open = False
        self._charged_blocks -= cdiv(acct.committed + acct.reserved, self.budget.block_size)

    def check_integrity(self) -> list[str]:
        """Problems found: the running total equals the sum of per-session charges."""
        total = sum(cdiv(a.committed + a.reserved, self.budget.block_size) for a in self._accounts.values())
        problems = [] if total == self._charged_blocks else [f"ledger total {self._charged_blocks} != {total}"]
        for key, acct in self._accounts.items():
            if acct.reserved != sum(r.tokens for r in acct.reservations):
                problems.append(f"session {key}: reserved {acct.reserved} != its open reservations")
        return problems

    def _close(self, res: Reservation) -> None:
        if not res.open:
            return
        res.open = False
        acct = self._accounts.get(res.key)
        if acct is None:
            return

        def drop() -> None:
            acct.reserved -= res.tokens
            acct.reservations.remove(res)

        self._recharge(res.key, drop)

    def _recharge(self, key: str, change) -> None:
        before = self.charged_blocks(key)
        change()
        self._charged_blocks += self.charged_blocks(key) - before
