"""SessionPins against a fake block pool with vLLM's reference semantics."""

from dataclasses import dataclass

import pytest

from vllm_stateful.engine.session_pins import SessionPins, cdiv, common_prefix_len

pytestmark = pytest.mark.unit


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: object = None  # vLLM's content hash of a full block


class FakePool:
    def __init__(self, n: int):
        self.blocks = [Block(i) for i in range(n)]

    def touch(self, blocks):
        for b in blocks:
            b.ref_cnt += 1

    def free_blocks(self, blocks):
        for b in blocks:
            assert b.ref_cnt > 0, "double free"
            b.ref_cnt -= 1

    def free(self) -> int:
        return sum(b.ref_cnt == 0 for b in self.blocks)


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_len([1, 2, 3], [1, 9, 3]) == 1
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len(list(range(1000)), list(range(500)) + [-1]) == 500


def test_hit_covers_partial_block_and_leaves_one_token_to_compute():
    pool = FakePool(10)
    pins = SessionPins(pool, block_size=4)
    pins.pin("s", list(range(10)), pool.blocks[:3])
    hit = pins.hit("s", list(range(10)) + [99, 98])
    assert hit.num_tokens == 10 and hit.blocks == pool.blocks[:3]
    # prompt equal to the pinned tokens: one token must still be computed
    assert pins.hit("s", list(range(10))).num_tokens == 9
    # divergence inside block 1: only blocks 0-1 are offered
    hit = pins.hit("s", [0, 1, 2, 3, 4, 77, 78])
    assert hit.num_tokens == 5 and hit.blocks == pool.blocks[:2]
    assert pins.hit("s", [42, 43]) is None and pins.hit("other", [0, 1]) is None


def test_repin_moves_references_and_release_returns_to_baseline():
    pool = FakePool(10)
    pins = SessionPins(pool, block_size=4)
    baseline = pool.free()
    pins.pin("s", list(range(6)), pool.blocks[:2])
    assert [b.ref_cnt for b in pool.blocks[:3]] == [1, 1, 0]
    # next turn: request shares block 0, has its own copy of the tail (block 5)
    pins.pin("s", list(range(9)), [pool.blocks[0], pool.blocks[5], pool.blocks[6]])
    assert pool.blocks[0].ref_cnt == 1 and pool.blocks[1].ref_cnt == 0 and pool.blocks[6].ref_cnt == 1
    assert pins.num_pinned_blocks() == 3 and pins.check_integrity() == []
    assert pins.truncate("s", 5) == 1 and pins.get("s").token_ids == list(range(5))
    assert pool.blocks[6].ref_cnt == 0
    assert pins.release("s") == 2 and pool.free() == baseline
    assert pins.release("s") == 0


def test_pin_rejects_too_few_blocks_and_integrity_reports_stolen_refs():
    pool = FakePool(4)
    pins = SessionPins(pool, block_size=4)
    with pytest.raises(ValueError):
        pins.pin("s", list(range(9)), pool.blocks[:2])
    pins.pin("s", list(range(8)), pool.blocks[:2])
    pool.blocks[1].ref_cnt = 0  # someone freed a pinned block behind our back
    assert any("block 1" in p for p in pins.check_integrity())


def test_release_all():
    pool = FakePool(8)
    pins = SessionPins(pool, block_size=2)
    pins.pin("a", [1, 2, 3], pool.blocks[:2])
    pins.pin("b", [1, 2], pool.blocks[:1])
    assert pool.blocks[0].ref_cnt == 2
    assert pins.release_all() == 3 and pool.free() == 8


def test_identical_content_is_pinned_in_one_block():
    pool = FakePool(12)
    pins = SessionPins(pool, block_size=4)
    for i, b in enumerate(pool.blocks[:8]):
        b.block_hash = ("h", i % 4)  # blocks 4-7 are duplicates of 0-3 (computed twice)
    baseline = pool.free()
    pins.pin("a", list(range(14)), pool.blocks[0:4])
    # b's request computed the same content in other blocks; its pin takes a's blocks instead
    pins.pin("b", list(range(14)), pool.blocks[4:8])
    assert pins.block_ids("b") == [0, 1, 2, 3] and pins.num_pinned_blocks() == 4
    assert [b.ref_cnt for b in pool.blocks[:8]] == [2, 2, 2, 2, 0, 0, 0, 0]
    assert pins.check_integrity() == []
    assert pins.fragmentation() == pytest.approx(2 / 16)  # 14 tokens in 4 blocks of 4
    pins.release("a")
    pins.pin("c", list(range(8)), pool.blocks[4:6])  # still pinned by b: c shares them
    assert pins.block_ids("c") == [0, 1] and pins.check_integrity() == []
    pins.release("b")
    pins.release("c")
    assert pool.free() == baseline and pins.fragmentation() == 0.0
    # once nobody pins the content, a new pin keeps its own blocks
    pins.pin("d", list(range(4)), pool.blocks[4:5])
    assert pins.block_ids("d") == [4] and pins.check_integrity() == []


def test_a_pinned_block_whose_hash_vllm_reset_no_longer_stands_for_the_content():
    pool = FakePool(8)
    pins = SessionPins(pool, block_size=4)
    pool.blocks[0].block_hash = pool.blocks[4].block_hash = "h0"
    pins.pin("a", list(range(4)), pool.blocks[0:1])
    pool.blocks[0].block_hash = None  # vLLM evicted it as invalid while pinned
    pins.pin("b", list(range(4)), pool.blocks[4:5])
    assert pins.block_ids("b") == [4]  # its own block, not the stale one
    pins.release("a")
    pins.release("b")
    assert pool.free() == 8 and pins.check_integrity() == [] and pins._by_hash == {} and pins._hash_of == {}


def _fragmentation_by_every_block(pins: SessionPins) -> float:
    """The definition, block by block (independent of SessionPins' O(sessions) bookkeeping)."""
    slots: dict[int, int] = {}
    for key in pins.session_ids():
        p = pins.get(key)
        for i, b in enumerate(p.blocks):
            slots[id(b)] = max(slots.get(id(b), 0), min(pins.block_size, p.num_tokens - i * pins.block_size))
    return 0.0 if not slots else 1.0 - sum(slots.values()) / (len(slots) * pins.block_size)


def test_totals_kept_as_pins_change_match_a_recount_over_every_block():
    """Turns that extend, fork, rewind, recompute shared content, truncate and release, at random:
    after each, the O(sessions) totals equal a recount, and pool references equal session references."""
    import random

    rng, bs = random.Random(7), 4
    pool = FakePool(200)
    pins = SessionPins(pool, block_size=bs)

    def fresh(n: int) -> list[Block]:
        got = [b for b in pool.blocks if b.ref_cnt == 0][:n]
        for b in got:
            b.block_hash = None  # vLLM resets a block's hash when it reuses it
        return got

    def run_turn(key: str, tokens: list[int], prefix: list[Block]) -> None:
        """A request whose first ``len(prefix)`` blocks are adopted; vLLM hashes every full block."""
        blocks = prefix + fresh(cdiv(len(tokens), bs) - len(prefix))
        for i in range(len(tokens) // bs):
            if blocks[i].block_hash is None:
                blocks[i].block_hash = ("h", tuple(tokens[: (i + 1) * bs]))
        pool.touch(blocks)  # the request's own references, given back when it finishes
        pins.pin(key, tokens, blocks)
        pool.free_blocks(blocks)

    for _ in range(400):
        key, op = rng.choice("abc"), rng.random()
        p = pins.get(key)
        tokens = [] if p is None else list(p.token_ids)
        if op < 0.45:  # a turn extends the session: vLLM gives it the full blocks, a copy of the partial one
            full = [] if p is None else p.blocks[: p.num_tokens // bs]
            run_turn(key, tokens + [rng.randrange(3) for _ in range(rng.randrange(1, 9))], full)
        elif op < 0.6 and tokens:  # fork/rewind: keep some full blocks, recompute the rest
            k = rng.randrange(0, len(tokens) // bs + 1)
            run_turn(key, tokens[: k * bs] + [rng.randrange(3) for _ in range(rng.randrange(1, 6))], p.blocks[:k])
        elif op < 0.7:  # other content is recomputed in fresh blocks (shared by hash with any pin of it)
            src = pins.get(rng.choice("abc"))
            run_turn(key, list(src.token_ids) if src and src.token_ids else [1, 2, 3, 4, 5], [])
        elif op < 0.85 and tokens:
            pins.truncate(key, rng.randrange(0, len(tokens)))
        else:
            pins.release(key)
        held = sum(len(pins.get(k).blocks) for k in pins.session_ids())
        assert pins.num_pinned_blocks() == len({id(b) for k in pins.session_ids() for b in pins.get(k).blocks})
        assert pins.fragmentation() == pytest.approx(_fragmentation_by_every_block(pins))
        assert sum(b.ref_cnt for b in pool.blocks) == held and pins.check_integrity() == []
    pins.release_all()
    assert pool.free() == len(pool.blocks) and pins.num_pinned_blocks() == 0 and pins._by_hash == {}


def test_a_turn_keeps_the_sessions_full_blocks_and_gives_back_its_partial_tail():
    pool = FakePool(8)
    pins = SessionPins(pool, block_size=4)
    pool.blocks[0].block_hash = "h0"
    pins.pin("a", list(range(6)), pool.blocks[:2])  # block 1 partial: no hash
    touched, freed = [], []
    pool.touch = lambda blocks, touch=pool.touch: (touched.extend(blocks), touch(blocks))
    pool.free_blocks = lambda blocks, free=pool.free_blocks: (freed.extend(blocks := list(blocks)), free(blocks))
    # the next turn: vLLM gives the request block 0 and a copy of the partial block 1 (block 6), which
    # it fills and hashes, then block 2 for the rest
    pool.blocks[6].block_hash = "h1"
    pins.pin("a", list(range(10)), [pool.blocks[0], pool.blocks[6], pool.blocks[2]])
    assert touched == [pool.blocks[6], pool.blocks[2]] and freed == [pool.blocks[1]]  # block 0 untouched
    assert [b.ref_cnt for b in pool.blocks[:3]] == [1, 0, 1] and pins.check_integrity() == []
    # the filled copy stands for its content: a recomputation of it is pinned there
    pool.blocks[5].block_hash = "h1"
    pins.pin("b", list(range(8)), [pool.blocks[0], pool.blocks[5]])
    assert pins.block_ids("b") == [0, 6] and pins.num_pinned_blocks() == 3


def test_a_kept_block_whose_hash_vllm_reset_gives_way_to_the_next_block_of_that_content():
    """vLLM resets a pinned block's hash when a KV connector reports it failed to load; the session
    keeps it in place across turns. The next block computed with that content takes over the index."""
    pool = FakePool(8)
    pins = SessionPins(pool, block_size=4)
    pool.blocks[0].block_hash = "h0"
    pins.pin("a", list(range(5)), pool.blocks[0:2])
    pool.blocks[0].block_hash = None
    pins.pin("a", list(range(9)), [pool.blocks[0], pool.blocks[2], pool.blocks[3]])  # keeps block 0 in place
    pins.pin("b", list(range(9)), pins.get("a").blocks)  # a fork
    assert pins.check_integrity() == []
    pool.blocks[4].block_hash = pool.blocks[5].block_hash = "h0"  # the content computed again, twice
    pins.pin("c", list(range(4)), [pool.blocks[4]])
    pins.pin("d", list(range(4)), [pool.blocks[5]])
    assert pins.block_ids("c") == pins.block_ids("d") == [4] and pins.check_integrity() == []
    pins.release_all()
    assert pool.free() == 8 and pins._by_hash == {} and pins._hash_of == {}
