"""The cell budget with data parallelism: one ``CellLedger`` per data-parallel rank.

Each rank is its own engine with its own KV pool, so each has its own budget
(``cell_budget`` applies per rank) and its own headroom for one max_model_len
request; a prefix is shared (charged once) only between sessions of one rank,
because only they can share its blocks.

Contract: a session's account lives in the ledger of the rank that holds its
KV. ``rank_of(key)`` names it the first time a key is used (the session's
``data_parallel_rank``); the rank is remembered until ``forget``, so closing a
session that already left the store still reaches its account. ``move`` is the
only way an account changes rank. With one rank this is a ``CellLedger``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vllm_stateful.sessions.admission import Budget, CellLedger, Reservation


class RankedLedgers:
    def __init__(self, budget: Budget, ranks: int, rank_of: Callable[[str], int | None]) -> None:
        if ranks < 1:
            raise ValueError("at least one data-parallel rank")
        self.budget = budget  # one rank's budget
        self.ledgers = [CellLedger(budget) for _ in range(ranks)]
        self._rank_of = rank_of
        self._ranks: dict[str, int] = {}

    def rank(self, key: str) -> int:
        rank = self._ranks.get(key)
        if rank is None:
            found = self._rank_of(key)
            if found is None:  # not a live session: it holds no account anywhere
                return 0
            rank = self._ranks[key] = found
        return rank

    def of(self, key: str) -> CellLedger:
        return self.ledgers[self.rank(key)]

    # --- all ranks ------------------------------------------------------------------

    @property
    def budget_blocks(self) -> int:
        return self.budget.budget_blocks * len(self.ledgers)

    def charged_blocks(self, key: str | None = None) -> int:
        if key is None:
            return sum(ledger.charged_blocks() for ledger in self.ledgers)
        return self.of(key).charged_blocks(key)

    def charged_blocks_of_rank(self, rank: int) -> int:
        return self.ledgers[rank].charged_blocks()

    def check_integrity(self) -> list[str]:
        if len(self.ledgers) == 1:
            return self.ledgers[0].check_integrity()
        return [f"rank {r}: {p}" for r, ledger in enumerate(self.ledgers) for p in ledger.check_integrity()]

    # --- one session: its rank's ledger ---------------------------------------------------

    def held_tokens(self, key: str) -> int:
        return self.of(key).held_tokens(key)

    def history_tokens(self, key: str) -> int:
        return self.of(key).history_tokens(key)

    def committed_tokens(self, key: str) -> int:
        return self.of(key).committed_tokens(key)

    def shared_blocks(self, key: str) -> int:
        return self.of(key).shared_blocks(key)

    def block_keys(self, key: str) -> list[bytes]:
        return self.of(key).block_keys(key)

    def room(self, key: str, ignore_budget: bool = False) -> int:
        return self.of(key).room(key, ignore_budget)

    def reserve(self, key: str, tokens: int, *args, **kwargs) -> Reservation:
        return self.of(key).reserve(key, tokens, *args, **kwargs)

    def check(self, key: str, *args, **kwargs) -> int:
        return self.of(key).check(key, *args, **kwargs)

    def settle(self, res: Reservation, *args, **kwargs) -> None:
        self.of(res.key).settle(res, *args, **kwargs)

    def cancel(self, res: Reservation) -> None:
        self.of(res.key).cancel(res)

    def set_committed(self, key: str, *args, **kwargs) -> None:
        self.of(key).set_committed(key, *args, **kwargs)

    def fits_committed(self, key: str, *args, **kwargs) -> bool:
        return self.of(key).fits_committed(key, *args, **kwargs)

    def uncharge(self, key: str, history: int | None = None) -> None:
        self.of(key).uncharge(key, history)

    def recharge(self, key: str, token_ids: Sequence[int], pinned_tokens: int | None = None) -> None:
        self.of(key).recharge(key, token_ids, pinned_tokens)

    def restore(self, key: str, scope: str, token_ids: Sequence[int]) -> bool:
        return self.of(key).restore(key, scope, token_ids)

    def forget(self, key: str) -> None:
        self.of(key).forget(key)
        self._ranks.pop(key, None)

    def move(self, key: str, rank: int, scope: str, token_ids: Sequence[int]) -> bool:
        """Move an idle session's account to ``rank`` (its KV left its old rank): charged there if
        its history fits now (True), else uncharged like a spilled session (False)."""
        if not 0 <= rank < len(self.ledgers):
            raise ValueError(f"data-parallel rank {rank} out of range 0..{len(self.ledgers) - 1}")
        self.of(key).forget(key)
        self._ranks[key] = rank
        return self.ledgers[rank].restore(key, scope, token_ids)
