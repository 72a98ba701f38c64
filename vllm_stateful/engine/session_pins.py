"""Which KV blocks each live session holds, and the references that keep them.

Pure bookkeeping over a block pool with vLLM's reference semantics: ``touch``
adds one reference to each block (taking it off the free queue), and
``free_blocks`` drops one (a block returns to the free queue at zero). A
session holds exactly one reference on each of its blocks, so a pinned block
can never be evicted, whatever the prefix cache or preemption does.

The contract that makes reuse safe: a session's blocks are never written
again. Tokens appended after ``len(token_ids)`` go to a private copy of the
partial last block (vLLM's copy-on-write for partial prefix hits), so
concurrent queries and a rolled-back turn cannot disturb the pinned prefix.

No vLLM import here: the scheduler passes its ``BlockPool``; tests pass a fake.
"""

from __future__ import annotations

import hashlib
import operator
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class BlockPoolLike(Protocol):
    def touch(self, blocks: Sequence[Any]) -> None: ...

    def free_blocks(self, ordered_blocks: Iterable[Any]) -> None: ...


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def token_digest(token_ids: Sequence[int]) -> str:
    """A fingerprint of a token sequence, computed the same way on both sides of the plugin."""
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()[:32]


def _same_prefix_len(held: Sequence[Any], blocks: Sequence[Any], limit: int) -> int:
    """How many leading ``blocks`` (of the first ``limit``) are the very blocks ``held`` at the same positions."""
    limit = min(limit, len(held), len(blocks))
    if all(map(operator.is_, held[:limit], blocks[:limit])):  # the usual turn: at C speed
        return limit
    n = 0
    while blocks[n] is held[n]:
        n += 1
    return n


def _extended(old: PinnedSession | None, tokens: list[int], same: int) -> Any:
    """``tokens`` as an int32 array, reusing the old pin's for its first ``same`` tokens (the tokens of
    the full blocks the new pin kept in place: the same blocks hold the same tokens)."""
    import numpy as np

    head = old.token_array[:same] if old is not None and old.token_array is not None else None
    if head is None or len(head) != same:
        return np.asarray(tokens, dtype=np.int32)
    return np.concatenate((head, np.asarray(tokens[same:], dtype=np.int32)))


def _stale(block: Any, indexed_hash: Any) -> bool:
    """The block no longer carries the hash it was indexed under (vLLM reset it)."""
    return getattr(block, "block_hash", None) != indexed_hash


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[lo:mid]) == list(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class PinnedSession:
    """KV of ``token_ids`` lives in ``blocks`` (block i holds tokens
    ``[i*block_size, (i+1)*block_size)``); the last block may be partial.

    ``block_hashes``: vLLM's prefix-cache hash chain of the full blocks of ``token_ids`` as the
    pinning request computed them under ``cache_salt`` (None when not known), so a request that
    references the pin (``prefix_refs``) need not hash the prefix again."""

    session_id: str
    token_ids: list[int] = field(default_factory=list)
    blocks: list[Any] = field(default_factory=list)
    block_hashes: list[Any] | None = None
    cache_salt: str | None = None
    # changes whenever ``token_ids`` does (a new pin or a trim): equal serials, equal tokens
    serial: int = 0
    # ``token_ids`` as int32 (None when not kept): a spliced prompt reaches the model-runner worker as
    # one buffer (``prefix_refs.prompt_array``), not as a list it pickles, unpickles and copies.
    # Never written once set: a waiting request holds a view of it (``prefix_refs.prompt_head``)
    token_array: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SessionHit:
    """Blocks a new request may adopt, covering its first ``num_tokens`` tokens."""

    blocks: list[Any]
    num_tokens: int


class SessionPins:
    """Per-session pinned KV blocks over one block pool (one KV cache group)."""

    def __init__(self, pool: BlockPoolLike, block_size: int) -> None:
        self._pool = pool
        self.block_size = block_size
        self._sessions: dict[str, PinnedSession] = {}
        # block hash -> [pinned block, session references]: one pinned block per content;
        # id(block) -> the hash it was indexed under (vLLM may reset a block's hash, see _canonical)
        self._by_hash: dict[Any, list[Any]] = {}
        self._hash_of: dict[int, Any] = {}
        # id(block) -> sessions holding it: kept as pins change, so the totals cost O(sessions)
        self._holders: dict[int, int] = {}
        self._serial = 0

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> PinnedSession | None:
        return self._sessions.get(session_id)

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def hit(self, session_id: str, prompt_token_ids: Sequence[int], known_equal: int = 0) -> SessionHit | None:
        """The longest prefix of ``prompt_token_ids`` whose KV the session holds.

        At most ``len(prompt_token_ids) - 1`` tokens: the model must compute at
        least one token to produce logits. ``None`` when nothing is reusable.
        ``known_equal``: the caller knows the first that many tokens equal the pin's
        (a prompt spliced from the pin): only the rest is compared.
        """
        pinned = self._sessions.get(session_id)
        if pinned is None or not pinned.token_ids or len(prompt_token_ids) < 2:
            return None
        known = min(known_equal, pinned.num_tokens, len(prompt_token_ids))
        if known:
            n = known + common_prefix_len(pinned.token_ids[known:], prompt_token_ids[known:])
        else:
            n = common_prefix_len(pinned.token_ids, prompt_token_ids)
        n = min(n, len(prompt_token_ids) - 1)
        if n <= 0:
            return None
        return SessionHit(blocks=pinned.blocks[: cdiv(n, self.block_size)], num_tokens=n)

    def pin(
        self,
        session_id: str,
        token_ids: Sequence[int],
        blocks: Sequence[Any],
        block_hashes: Sequence[Any] | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """Make ``blocks`` (covering ``token_ids``) the session's KV; ``block_hashes``, when given,
        are vLLM's hashes of (at least) its full blocks under ``cache_salt``.

        Takes a reference on the new blocks before dropping the old ones, so
        blocks shared by both never pass through the free queue. A block whose
        content (vLLM's block hash) another session already pins is replaced by
        that pinned block: each content is pinned in one physical block, so
        sessions with a common prefix share it (the budget charges it once).

        The session's full blocks that ``blocks`` starts with, the very same ones in place, keep
        their reference untouched: a turn that extends the session costs its new blocks, not its
        history. A partial last block goes round again, so once filled (hashed) it is indexed.
        """
        needed = cdiv(len(token_ids), self.block_size)
        if len(blocks) < needed:
            raise ValueError(f"{len(blocks)} blocks cannot hold {len(token_ids)} tokens")
        old = self._sessions.get(session_id)
        kept = (
            0 if old is None else _same_prefix_len(old.blocks, blocks, min(needed, old.num_tokens // self.block_size))
        )
        added = [self._canonical(b) for b in blocks[kept:needed]]
        dropped = [] if old is None else old.blocks[kept:]
        self._pool.touch(added)
        self._hold(dropped, -1)  # counts before adding: a block dropped and added again is indexed as it is now
        self._hold(added, +1)
        full = len(token_ids) // self.block_size
        hashes = None if block_hashes is None or len(block_hashes) < full else list(block_hashes[:full])
        self._serial += 1
        new_blocks = (old.blocks[:kept] if old is not None else []) + added
        tokens = list(token_ids)
        self._sessions[session_id] = PinnedSession(
            session_id,
            tokens,
            new_blocks,
            hashes,
            cache_salt,
            self._serial,
            _extended(old, tokens, kept * self.block_size),
        )
        self._pool.free_blocks(reversed(dropped))

    def truncate(self, session_id: str, num_tokens: int) -> int:
        """Keep only the first ``num_tokens`` tokens; returns blocks released."""
        pinned = self._sessions.get(session_id)
        if pinned is None or num_tokens >= pinned.num_tokens:
            return 0
        keep = cdiv(max(num_tokens, 0), self.block_size)
        dropped = pinned.blocks[keep:]
        pinned.blocks = pinned.blocks[:keep]
        pinned.token_ids = pinned.token_ids[: max(num_tokens, 0)]
        if pinned.token_array is not None:
            pinned.token_array = pinned.token_array[: pinned.num_tokens]
        if pinned.block_hashes is not None:
            pinned.block_hashes = pinned.block_hashes[: pinned.num_tokens // self.block_size]
        self._serial += 1
        pinned.serial = self._serial
        self._drop(dropped)
        return len(dropped)

    def release(self, session_id: str) -> int:
        """Drop the session's references; returns how many blocks it held."""
        pinned = self._sessions.pop(session_id, None)
        if pinned is None:
            return 0
        self._drop(pinned.blocks)
        return len(pinned.blocks)

    def release_all(self) -> int:
        return sum(self.release(sid) for sid in list(self._sessions))

    def summary(self) -> dict[str, tuple[int, int]]:
        """session key -> (pinned tokens, pinned blocks)."""
        return {k: (p.num_tokens, len(p.blocks)) for k, p in self._sessions.items()}

    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by at least one session."""
        return len(self._holders)

    def block_ids(self, session_id: str) -> list[int]:
        pinned = self._sessions.get(session_id)
        return [] if pinned is None else [b.block_id for b in pinned.blocks]

    def fragmentation(self) -> float:
        """Token slots allocated but unused in pinned blocks (partial last blocks) over all
        pinned slots; 0.0 when nothing is pinned. O(sessions): only a session's last block can be
        partial, and a block another session holds at an earlier position is full there."""
        if not self._holders:
            return 0.0
        tails: dict[int, list[int]] = {}  # id(partial last block) -> [most slots used, sessions ending in it]
        for p in self._sessions.values():
            used = p.num_tokens % self.block_size
            if used and p.blocks:
                tail = tails.setdefault(id(p.blocks[-1]), [0, 0])
                tail[0], tail[1] = max(tail[0], used), tail[1] + 1
        unused = sum(self.block_size - used for key, (used, n) in tails.items() if self._holders.get(key) == n)
        return unused / (len(self._holders) * self.block_size)

    def _canonical(self, block: Any) -> Any:
        h = getattr(block, "block_hash", None)
        entry = self._by_hash.get(h) if h is not None else None
        # a pinned block whose hash vLLM reset (evicted as invalid) no longer stands for this content
        if entry is None or _stale(entry[0], h):
            return block
        return entry[0]

    def _index(self, blocks: Iterable[Any], delta: int) -> None:
        for b in blocks:
            h = self._hash_of.get(id(b)) if delta < 0 else getattr(b, "block_hash", None)
            if h is None:
                continue
            entry = self._by_hash.get(h)
            if delta > 0 and entry is not None and _stale(entry[0], h):
                # the indexed block's hash was reset (vLLM evicted it as invalid): ``b`` stands for it now
                if self._hash_of.get(id(entry[0])) == h:
                    del self._hash_of[id(entry[0])]
                entry = None
            if entry is None and delta > 0:
                entry = self._by_hash[h] = [b, 0]
                self._hash_of[id(b)] = h
            if entry is None or entry[0] is not b:
                continue  # another block stands for this content (its hash was reset): not indexed
            entry[1] += delta
            if entry[1] <= 0:
                del self._by_hash[h]
                del self._hash_of[id(b)]

    def _hold(self, blocks: Sequence[Any], delta: int) -> None:
        """Count ``delta`` session references on ``blocks`` (in ``_holders`` and the hash index)."""
        holders = self._holders
        for b in blocks:
            n = holders.get(id(b), 0) + delta
            if n > 0:
                holders[id(b)] = n
            else:
                holders.pop(id(b), None)
        self._index(blocks, delta)

    def _drop(self, blocks: Sequence[Any]) -> None:
        self._hold(blocks, -1)
        self._pool.free_blocks(reversed(blocks))

    def references(self) -> dict[int, int]:
        """block_id -> number of session references on it."""
        refs: dict[int, int] = {}
        for p in self._sessions.values():
            for b in p.blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        return refs

    def check_integrity(self) -> list[str]:
        """Problems found (empty when sound): every session holds exactly the
        blocks its tokens need, and every held block still carries at least as
        many references as sessions hold on it."""
        problems = []
        for p in self._sessions.values():
            if len(p.blocks) != cdiv(p.num_tokens, self.block_size):
                problems.append(f"session {p.session_id}: {len(p.blocks)} blocks for {p.num_tokens} tokens")
            if p.token_array is not None and p.token_array.tolist() != p.token_ids:
                problems.append(f"session {p.session_id}: its token array differs from its tokens")
        by_id = {b.block_id: b for p in self._sessions.values() for b in p.blocks}
        held = Counter(id(b) for p in self._sessions.values() for b in p.blocks)
        for h, (block, count) in self._by_hash.items():
            if _stale(block, h):
                continue  # never used again: replaced when the content is indexed anew
            if count != held[id(block)]:
                problems.append(f"block {block.block_id}: indexed with {count} session refs, held by another number")
        hashed: dict[Any, set[int]] = {}
        for b in by_id.values():
            if getattr(b, "block_hash", None) is not None:
                hashed.setdefault(b.block_hash, set()).add(b.block_id)
        problems += [f"blocks {sorted(ids)} pin the same content" for ids in hashed.values() if len(ids) > 1]
        for block_id, refs in self.references().items():
            ref_cnt = getattr(by_id[block_id], "ref_cnt", refs)
            if ref_cnt < refs:
                problems.append(f"block {block_id}: ref_cnt {ref_cnt} < {refs} session refs")
        return problems
