"""Cell-budget admission with reservations: refuse growth that could exceed a
budget, never evict.

A "cell" is one KV token slot; sessions pin whole blocks, so budgets are
enforced in blocks. Every piece of work that can grow a session (a committing
turn, an acknowledged append) *reserves* its tokens before it starts; the
reservation is settled into the session's committed tokens when the work
commits, or cancelled when it fails. Admission checks the total charge, so
concurrent requests cannot overshoot the budget together, and acknowledged
work never fails a budget check later.

Charged by physical cells: a session occupies ``cdiv(committed + reserved,
block_size)`` blocks. Its full blocks of known content -- committed tokens
that the engine pins in full blocks, and the prompt of a reserved turn or
session fill -- are keyed by a chain digest of their tokens, scoped by tenant:
the identity vLLM's prefix cache gives a block (tenants have their own cache
salt). The engine pins one block per content (``SessionPins``), so a key
several sessions hold is charged once; the rest of a session's footprint
(partial last blocks, the block of a turn's last token, reserved growth of
unknown content) is charged to that session alone. When a session closes, a
shared block stays charged as long as any survivor holds it.

Refusals are ``SessionError``: 429 (quota, budget, with Retry-After) or 413
(model context). No vLLM import.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Sequence
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


def chain_keys(token_ids: Sequence[int], block_size: int, known: Sequence[bytes] = ()) -> list[bytes]:
    """Digests of every full block of ``token_ids``; digest i covers blocks 0..i (like vLLM's block
    hashes). ``known``: digests already computed for a prefix of the same tokens (reused)."""
    keys = list(known)
    prev = keys[-1] if keys else b""
    for i in range(len(keys), len(token_ids) // block_size):
        block = array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        keys.append(prev)
    return keys


@dataclass
class Reservation:
    """Tokens one piece of work may add to a session, held until settled or cancelled.
    ``keys``: digests of the full blocks of its known content beyond the committed ones."""

    key: str
    tokens: int
    open: bool = True
    keys: list[bytes] = field(default_factory=list)


@dataclass
class _Account:
    scope: str
    committed: int = 0  # committed tokens charged to the budget (0 while the session's KV is out)
    history: int = 0  # committed tokens the session holds (context and quota count these)
    reserved: int = 0
    reservations: list[Reservation] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # the committed full blocks
    basis: Sequence[int] = ()  # the committed tokens ``keys`` were computed from


class CellLedger:
    """Committed and reserved tokens per session (keyed by incarnation key), charged by physical block."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._accounts: dict[str, _Account] = {}
        self._refs: Counter[tuple[str, bytes]] = Counter()  # (scope, digest) -> sessions holding it
        self._private = 0  # blocks charged to one session each

    # --- reading ---------------------------------------------------------------

    def held_tokens(self, key: str) -> int:
        """Committed plus reserved tokens of one session."""
        acct = self._accounts.get(key)
        return 0 if acct is None else acct.committed + acct.reserved

    def history_tokens(self, key: str) -> int:
        """Committed plus reserved tokens of one session, charged or not (context and quota)."""
        acct = self._accounts.get(key)
        return 0 if acct is None else acct.history + acct.reserved

    def committed_tokens(self, key: str) -> int:
        """Committed tokens the session is charged for (0 once spilled: see ``server/spill.py``)."""
        acct = self._accounts.get(key)
        return 0 if acct is None else acct.committed

    def charged_blocks(self, key: str | None = None) -> int:
        """Blocks charged in all (shared ones once), or the blocks one session occupies."""
        if key is None:
            return len(self._refs) + self._private
        return cdiv(self.held_tokens(key), self.budget.block_size)

    def shared_blocks(self, key: str) -> int:
        """Blocks of one session that another session holds too (charged once for all)."""
        acct = self._accounts.get(key)
        if acct is None:
            return 0
        return sum(1 for k in self._keys_of(acct) if self._refs[(acct.scope, k)] > 1)

    def block_keys(self, key: str) -> list[bytes]:
        """Digests of the session's committed full blocks (see ``chain_keys``)."""
        acct = self._accounts.get(key)
        return [] if acct is None else list(acct.keys)

    def room(self, key: str, ignore_budget: bool = False) -> int:
        """Most tokens ``key`` could still reserve under its quota and the budget (growth of
        unknown content: charged to the session alone)."""
        held, history = self.held_tokens(key), self.history_tokens(key)
        quota_room = self.budget.session_quota_tokens - history
        free_blocks = self.budget.budget_blocks - self.charged_blocks()
        acct = self._accounts.get(key)
        own_partial = 0 if acct is None else self._footprint(acct) * self.budget.block_size - held
        budget_room = free_blocks * self.budget.block_size + own_partial
        if ignore_budget:  # every other session could be spilled: the whole budget
            budget_room = self.budget.budget_blocks * self.budget.block_size - held
        return max(0, min(quota_room, budget_room, self.budget.max_model_len - history))

    # --- changing ---------------------------------------------------------------

    def reserve(
        self,
        key: str,
        tokens: int,
        context_extra: int = 0,
        what: str = "this request",
        known: Sequence[int] | None = None,
        scope: str = "",
        force: bool = False,
    ) -> Reservation:
        """Reserve ``tokens`` for ``key``, or raise 413 / 429 and change nothing.

        ``context_extra``: tokens the work needs in the model's context beyond
        what it keeps (e.g. the one token an ingestion prefill samples).
        ``known``: the session's tokens after this work's prompt (committed
        history + new input), when known: its full blocks are charged once if
        another session of ``scope`` (the tenant) holds the same content.
        ``force``: reserve without any check (work acknowledged before a restart, which must run).
        """
        tokens = max(0, int(tokens))
        res = Reservation(key, tokens, keys=self._new_keys(key, known))
        if not force:
            self._check(key, tokens, context_extra, what, res.keys, scope)
        acct = self._accounts.setdefault(key, _Account(scope))
        self._update(acct, lambda: self._open(acct, res))
        return res

    def check(
        self, key: str, tokens: int, context_extra: int = 0, what: str = "this request", budget: bool = True
    ) -> int:
        """Raise 413 / 429 as ``reserve`` would, without reserving; returns the blocks it would add.
        ``budget=False``: the context and quota only (the budget may be freed by spilling)."""
        return self._check(key, tokens, context_extra, what, [], "", budget)

    def settle(
        self,
        res: Reservation,
        committed_tokens: int,
        token_ids: Sequence[int] | None = None,
        pinned_tokens: int | None = None,
    ) -> None:
        """End ``res``; the session now holds ``committed_tokens`` committed tokens. ``token_ids``:
        those tokens (the caller must not mutate the list) and ``pinned_tokens``: how many of them
        the engine pins (default all): full blocks among those are shared by content."""
        self._close(res)
        self.set_committed(res.key, committed_tokens, token_ids, pinned_tokens)

    def cancel(self, res: Reservation) -> None:
        """End ``res`` without committing anything (idempotent)."""
        self._close(res)

    def set_committed(
        self, key: str, committed_tokens: int, token_ids: Sequence[int] | None = None, pinned_tokens: int | None = None
    ) -> None:
        acct = self._accounts.get(key)
        if acct is None:
            return
        committed = max(0, committed_tokens)
        tokens = token_ids if token_ids is not None and len(token_ids) == committed else ()
        keyed = len(tokens) if pinned_tokens is None else max(0, min(pinned_tokens, len(tokens)))
        keys = self._rekey(acct, tokens)[: keyed // self.budget.block_size]

        def change() -> None:
            acct.committed = acct.history = committed
            acct.keys, acct.basis = keys, tokens

        self._update(acct, change)

    def fits_committed(
        self, key: str, committed_tokens: int, token_ids: Sequence[int], pinned_tokens: int | None = None
    ) -> bool:
        """Whether ``set_committed`` with these values keeps the charge within the budget (or does
        not raise it). A shorter history can cost more: a full block shared with another session
        may become this session's private partial block."""
        acct = self._accounts.get(key)
        if acct is None:
            return True
        saved = (acct.committed, acct.history, acct.keys, acct.basis)
        charged = self.charged_blocks()
        self.set_committed(key, committed_tokens, token_ids, pinned_tokens)
        after = self.charged_blocks()

        def undo() -> None:
            acct.committed, acct.history, acct.keys, acct.basis = saved

        self._update(acct, undo)
        return after <= max(charged, self.budget.budget_blocks)

    def uncharge(self, key: str, history: int | None = None) -> None:
        """The session's KV left the pool (spilled): its committed tokens stop counting against the
        budget, still against its context and quota. ``history``: its committed length now."""
        acct = self._accounts.get(key)
        if acct is None:
            return

        def change() -> None:
            acct.committed = 0
            acct.keys, acct.basis = [], ()
            if history is not None:
                acct.history = history

        self._update(acct, change)

    def recharge(self, key: str, token_ids: Sequence[int], pinned_tokens: int | None = None) -> None:
        """Charge an uncharged session for its whole history again (before its KV is rebuilt);
        429 ``cell_budget_exceeded`` and nothing changed if it does not fit."""
        acct = self._accounts.get(key)
        if acct is None or acct.committed >= acct.history:
            return
        held_after = len(token_ids) + acct.reserved
        keys = chain_keys(token_ids, self.budget.block_size)
        self._budget_growth(key, acct.scope, held_after, keys, "restoring this session's KV", enforce=True)
        self.set_committed(key, len(token_ids), token_ids, pinned_tokens)

    def restore(self, key: str, scope: str, token_ids: Sequence[int]) -> bool:
        """Charge a session restored after a restart for its committed tokens if they fit the
        budget now (True); otherwise it stays uncharged, like a spilled session, and is charged
        when it is next used (False). Nothing restored can push the charge over the budget."""
        tokens = list(token_ids)
        try:
            res = self.reserve(key, len(tokens), known=tokens, scope=scope, what="a restored session")
        except SessionError:
            self._accounts.setdefault(key, _Account(scope, history=len(tokens)))
            return False
        self.settle(res, len(tokens), tokens)
        return True

    def forget(self, key: str) -> None:
        """The session is gone: drop its account and every reservation on it."""
        acct = self._accounts.get(key)
        if acct is None:
            return
        for res in acct.reservations:
            res.open = False

        def drop() -> None:
            acct.committed = acct.reserved = acct.history = 0
            acct.keys, acct.reservations = [], []

        self._update(acct, drop)
        del self._accounts[key]

    def check_integrity(self) -> list[str]:
        """Problems found: the running totals equal a recount over the sessions."""
        refs: Counter[tuple[str, bytes]] = Counter()
        private = 0
        problems = []
        for key, acct in self._accounts.items():
            keys = self._keys_of(acct)
            refs.update((acct.scope, k) for k in keys)
            private += self._private_of(acct)
            if acct.reserved != sum(r.tokens for r in acct.reservations):
                problems.append(f"session {key}: reserved {acct.reserved} != its open reservations")
        if refs != +self._refs or private != self._private:
            problems.append(
                f"ledger total {self.charged_blocks()} != {len(refs) + private} recounted "
                f"(shared {len(self._refs)} vs {len(refs)}, private {self._private} vs {private})"
            )
        return problems

    # --- internals ---------------------------------------------------------------

    def _footprint(self, acct: _Account) -> int:
        return cdiv(acct.committed + acct.reserved, self.budget.block_size)

    def _private_of(self, acct: _Account) -> int:
        return max(0, self._footprint(acct) - len(self._keys_of(acct)))

    @staticmethod
    def _keys_of(acct: _Account) -> set[bytes]:
        """Every content key the session holds (committed and reserved; a content counts once)."""
        return set(acct.keys).union(*(r.keys for r in acct.reservations))

    def _new_keys(self, key: str, known: Sequence[int] | None) -> list[bytes]:
        """Keys of ``known``'s full blocks beyond the session's committed keys; none when the
        session has other open reservations (their content is not known: charged privately)."""
        acct = self._accounts.get(key)
        if known is None or (acct is not None and acct.reservations):
            return []
        base = [] if acct is None else self._rekey(acct, known[: len(acct.keys) * self.budget.block_size])
        if acct is not None and base != acct.keys:
            return []  # the prompt does not extend the committed history
        return chain_keys(known, self.budget.block_size, base)[len(base) :]

    def _rekey(self, acct: _Account, tokens: Sequence[int]) -> list[bytes]:
        """Keys of ``tokens``, reusing the account's keys over the prefix it shares with its basis."""
        bs = self.budget.block_size
        reuse = 0
        n = min(len(acct.keys), len(tokens) // bs)
        if n and list(tokens[: n * bs]) == list(acct.basis[: n * bs]):
            reuse = n
        return chain_keys(tokens, bs, acct.keys[:reuse])

    def _check(
        self,
        key: str,
        tokens: int,
        context_extra: int,
        what: str,
        new_keys: list[bytes],
        scope: str,
        budget: bool = True,
    ) -> int:
        held_before = self.held_tokens(key)
        held_after = held_before + tokens
        history_after = self.history_tokens(key) + tokens
        if history_after + context_extra > self.budget.max_model_len:
            raise SessionError(
                413,
                f"{what} would take the session to {history_after + context_extra} tokens (including work already "
                f"accepted on it), over the model's context length of {self.budget.max_model_len}; "
                "the session is unchanged",
                "context_length_exceeded",
            )
        if history_after > self.budget.session_quota_tokens:
            raise SessionError(
                429,
                f"session would hold {history_after} tokens, over its quota of {self.budget.session_quota_tokens}",
                "session_quota_exceeded",
                retry_after=RETRY_AFTER_S,
            )
        return self._budget_growth(key, scope, held_after, new_keys, what, enforce=budget)

    def _budget_growth(
        self, key: str, scope: str, held_after: int, new_keys: Sequence[bytes], what: str, enforce: bool
    ) -> int:
        """Blocks the charge grows by when ``key`` holds ``held_after`` tokens (charged) with the
        content ``new_keys`` added; with ``enforce``, 429 if that passes the budget."""
        bs = self.budget.block_size
        acct = self._accounts.get(key)
        scope = acct.scope if acct is not None else scope
        held_keys = set() if acct is None else self._keys_of(acct)
        added = set(new_keys) - held_keys
        new_shared = sum(1 for k in added if (scope, k) not in self._refs)
        private_before = max(0, cdiv(self.held_tokens(key), bs) - len(held_keys))
        private_after = max(0, cdiv(held_after, bs) - len(held_keys) - len(added))
        growth = private_after - private_before + new_shared
        charged = self.charged_blocks()
        if enforce and growth > 0 and charged + growth > self.budget.budget_blocks:
            raise SessionError(
                429,
                f"cell budget exhausted: {charged} of {self.budget.budget_blocks} blocks pinned or "
                f"reserved, {what} needs {growth} more; close sessions or let idle ones expire",
                "cell_budget_exceeded",
                retry_after=RETRY_AFTER_S,
            )
        return growth

    def _open(self, acct: _Account, res: Reservation) -> None:
        acct.reserved += res.tokens
        acct.reservations.append(res)

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

        self._update(acct, drop)

    def _update(self, acct: _Account, change) -> None:
        """Apply ``change`` to ``acct``, keeping the key references and the private total in step."""
        keys_before, private_before = self._keys_of(acct), self._private_of(acct)
        change()
        keys_after = self._keys_of(acct)
        for k in keys_after - keys_before:
            self._refs[(acct.scope, k)] += 1
        for k in keys_before - keys_after:
            ref = (acct.scope, k)
            self._refs[ref] -= 1
            if self._refs[ref] <= 0:
                del self._refs[ref]
        self._private += self._private_of(acct) - private_before
