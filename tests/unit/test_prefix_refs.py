"""Prefix references (engine/prefix_refs.py) on vLLM's own ``Request`` and block hasher: a request
sent with only the tokens after its reference, once spliced, is the request vLLM builds from the
whole prompt (tokens, block hashes); references the pin cannot satisfy are refused. No engine."""

import random

import pytest

from vllm_stateful.engine.prefix_refs import (
    Spliced,
    count_sent_only,
    prompt_array,
    prompt_head,
    splice,
    unresolved_reason,
)
from vllm_stateful.engine.request_tags import PrefixRef
from vllm_stateful.engine.session_pins import SessionPins

pytestmark = pytest.mark.unit

BS = 16
MAX_LEN = 4096
ANY = 1 << 62  # no sync since the reference's generation


class Pool:
    def touch(self, blocks):
        pass

    def free_blocks(self, blocks):
        pass


class Block:
    def __init__(self, i: int) -> None:
        self.block_id, self.block_hash = i, None


def _hasher():
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256_cbor)
    return get_request_block_hasher(BS, sha256_cbor)


def _request(prompt: list[int], salt: str | None = "tenant-salt", request_id: str = "r"):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return Request(
        request_id, list(prompt), SamplingParams(max_tokens=4), None, cache_salt=salt, block_hasher=_hasher()
    )


def _pinned(history: list[int], salt: str | None = "tenant-salt"):
    """A session pinned as the scheduler pins it: the finished request's tokens and hashes."""
    pins = SessionPins(Pool(), BS)
    pinning = _request(history, salt)
    pins.pin("k", pinning.all_token_ids[:], [Block(i) for i in range(-(-len(history) // BS))],
             pinning.block_hashes, salt)  # fmt: skip
    return pins


@pytest.mark.parametrize("referenced", [16, 250, 256, 999])
def test_a_spliced_request_is_the_request_of_the_whole_prompt(referenced):
    rng = random.Random(referenced)
    history = [rng.randrange(10, 3000) for _ in range(1000)]
    new = [rng.randrange(10, 3000) for _ in range(40)]
    pins = _pinned(history)
    pinned = pins.get("k")
    sent = _request((history + new)[referenced:])
    ref = PrefixRef(generation=3, tokens=referenced)
    assert unresolved_reason(ref, pinned, ANY, sent, MAX_LEN) is None
    spliced = splice(sent, pinned, ref, BS)
    whole = _request(history + new)
    assert sent.prompt_token_ids == whole.prompt_token_ids and list(sent.all_token_ids) == whole.prompt_token_ids
    assert sent.num_prompt_tokens == sent.num_tokens == len(history) + len(new)
    assert sent.block_hashes == whole.block_hashes  # the prefix's taken from the pin, the rest hashed
    assert (spliced.tokens, spliced.serial) == (referenced, pinned.serial)
    # the generated tokens then extend it as they would the whole one
    sent.append_output_token_ids([7] * 30)
    whole.append_output_token_ids([7] * 30)
    assert sent.block_hashes == whole.block_hashes and list(sent.all_token_ids) == list(whole.all_token_ids)
    # the session's hit skips comparing the spliced prefix, with the same answer as comparing it
    assert pins.hit("k", sent.all_token_ids, known_equal=referenced) == pins.hit("k", sent.all_token_ids)
    # what the worker gets instead of the list: the same tokens in one int32 buffer
    array = prompt_array(prompt_head(pinned, ref), (history + new)[referenced:])
    assert array.dtype.name == "int32" and array.tolist() == whole.prompt_token_ids


def test_a_pins_token_array_follows_its_tokens_through_turns_rewinds_and_trims():
    pins = SessionPins(Pool(), 4)
    blocks = [Block(i) for i in range(20)]
    pins.pin("k", list(range(10)), blocks[:3])
    first = pins.get("k").token_array
    pins.pin("k", list(range(10)) + [50, 51, 52], [*blocks[:2], blocks[5], blocks[6]])  # a turn: 2 blocks kept
    assert pins.get("k").token_array.tolist() == list(range(10)) + [50, 51, 52] and pins.check_integrity() == []
    assert first.tolist() == list(range(10))  # the old pin's array is not written
    pins.pin("k", [1, 2, 3, 4, 9], [blocks[7], blocks[8]])  # nothing kept: built anew
    assert pins.get("k").token_array.tolist() == [1, 2, 3, 4, 9]
    pins.truncate("k", 3)
    assert pins.get("k").token_array.tolist() == [1, 2, 3] and pins.check_integrity() == []
    ref = PrefixRef(generation=1, tokens=2)
    assert prompt_array(prompt_head(pins.get("k"), ref), [8]).tolist() == [1, 2, 8]
    assert prompt_head(pins.get("k"), PrefixRef(generation=1, tokens=4)) is None  # longer than the pin
    pins.get("k").token_array = None  # a pin without one: the prompt goes as a list
    assert prompt_head(pins.get("k"), ref) is None


def test_a_waiting_requests_prompt_head_is_a_view_that_later_pins_never_change():
    import numpy as np

    pins = SessionPins(Pool(), 4)
    blocks = [Block(i) for i in range(20)]
    pins.pin("k", list(range(12)), blocks[:3])
    head = prompt_head(pins.get("k"), PrefixRef(generation=1, tokens=8))
    assert np.shares_memory(head, pins.get("k").token_array)  # held while waiting: no copy
    pins.pin("k", list(range(12)) + [40, 41], [*blocks[:3], blocks[9]])  # the session moves on
    pins.truncate("k", 5)  # and rewinds below the head
    pins.pin("k", [9] * 16, blocks[10:14])  # and is replaced
    assert head.tolist() == list(range(8))
    assert prompt_array(head, [3, 4]).tolist() == [*range(8), 3, 4]


def test_another_salt_never_splices_and_a_pin_without_hashes_gets_them_computed():
    rng = random.Random(1)
    history = [rng.randrange(10, 3000) for _ in range(300)]
    pins = _pinned(history, salt="tenant-a")
    other = _request(history[256:] + [5, 6, 7], salt="tenant-b")
    assert "cache salt" in unresolved_reason(PrefixRef(0, 256), pins.get("k"), ANY, other, MAX_LEN)
    pins.pin("j", history, pins.get("k").blocks, None, "tenant-a")  # a pin that kept no hashes
    sent = _request(history[256:] + [5, 6, 7], salt="tenant-a")
    assert unresolved_reason(PrefixRef(0, 256), pins.get("j"), ANY, sent, MAX_LEN) is None
    splice(sent, pins.get("j"), PrefixRef(0, 256), BS)
    assert sent.block_hashes == _request(history + [5, 6, 7], salt="tenant-a").block_hashes


def test_references_the_pin_cannot_satisfy_are_refused():
    history = list(range(100, 400))
    pins = _pinned(history)
    pinned = pins.get("k")
    sent = _request([1, 2, 3])
    assert "no pinned KV" in unresolved_reason(PrefixRef(0, 64), None, ANY, sent, MAX_LEN)
    assert "synced to 63 tokens" in unresolved_reason(PrefixRef(1, 64), pinned, 63, sent, MAX_LEN)
    assert unresolved_reason(PrefixRef(1, 64), pinned, 64, sent, MAX_LEN) is None
    assert "fewer than" in unresolved_reason(PrefixRef(2, 301), pinned, ANY, sent, MAX_LEN)
    assert unresolved_reason(PrefixRef(2, 300), pinned, ANY, sent, MAX_LEN) is None
    # vLLM refuses a prompt of max_model_len tokens or more: so is the reference that would splice one
    assert "would not fit" in unresolved_reason(PrefixRef(2, 300), pinned, ANY, sent, 303)
    assert unresolved_reason(PrefixRef(2, 300), pinned, ANY, sent, 304) is None
    # another tenant's request (another cache salt) never splices this pin
    other = _request([1, 2, 3], salt="other")
    assert "cache salt" in unresolved_reason(PrefixRef(2, 64), pinned, ANY, other, MAX_LEN)
    sent.append_output_token_ids(9)
    assert "plain token prompt" in unresolved_reason(PrefixRef(2, 64), pinned, ANY, sent, MAX_LEN)


def test_a_reference_stays_good_through_syncs_that_keep_its_tokens():
    from types import SimpleNamespace

    from vllm_stateful.engine.control import _SYNCS_KEPT, SessionControl

    control = SessionControl(SimpleNamespace(session_pins=SessionPins(Pool(), BS), vllm_config=None))
    assert control.referencable_tokens("k", 0) >= 1 << 40  # never synced: nothing changed
    control.op_sync("k", 500)  # generation 1: the first commit
    control.op_sync("k", 520)  # 2: an append committed while a query was on its way
    assert control.referencable_tokens("k", 1) == 520 and control.referencable_tokens("k", 2) >= 1 << 40
    control.op_sync("k", 300)  # 3: a rewind to 300 tokens
    control.op_sync("k", 900)  # 4: then more data
    assert [control.referencable_tokens("k", g) for g in (1, 2, 3)] == [300, 300, 900]
    assert control.referencable_tokens("k", 5) == 0  # a generation this key never had
    control.op_leave("k")  # moved to another rank: nothing it referenced here is still shared
    assert control.referencable_tokens("k", 4) == 0
    for _ in range(_SYNCS_KEPT):
        control.op_sync("k", 1000)
    assert control.referencable_tokens("k", 4) == 0  # older than the syncs remembered
    assert control.referencable_tokens("k", control.generation("k") - 1) == 1000
    control.op_release("k")
    assert control.referencable_tokens("k", 3) == 0


def test_prefill_stats_count_the_tokens_sent_once_set_over_the_whole_prompt():
    from vllm.v1.metrics.stats import PrefillStats

    stats = PrefillStats()
    count_sent_only(stats, Spliced(1, 990))  # not set yet: left alone
    assert stats.num_prompt_tokens == 0
    stats.set(num_prompt_tokens=1040, num_local_cached_tokens=1030, num_external_cached_tokens=0)
    count_sent_only(stats, Spliced(1, 990))
    assert (stats.num_prompt_tokens, stats.num_cached_tokens, stats.num_computed_tokens) == (50, 40, 10)
    assert stats.num_local_cached_tokens == 40


def test_pins_keep_their_hashes_through_trims_and_change_serial():
    history = list(range(100, 400))  # 18 full blocks + 12 tokens
    pins = _pinned(history)
    pinned = pins.get("k")
    assert len(pinned.block_hashes) == 300 // BS
    serial = pinned.serial
    pins.truncate("k", 100)
    assert len(pinned.block_hashes) == 100 // BS and pinned.serial != serial
    assert pinned.block_hashes == _request(history[:100]).block_hashes
    pins.pin("j", pinned.token_ids, pinned.blocks)  # without hashes: none kept, none invented
    assert pins.get("j").block_hashes is None


def test_prompt_arrays_go_only_where_every_reader_in_the_worker_takes_one():
    from types import SimpleNamespace as NS

    from vllm_stateful.engine.prefix_refs import array_safe, arrays_reach_the_worker

    def config(**changes):
        base = {
            "model_config": NS(uses_mrope=False, logits_processors=None),
            "use_v2_model_runner": False,
            "parallel_config": NS(distributed_executor_backend="mp"),
        }
        return NS(**{**base, **changes})

    assert arrays_reach_the_worker(config()) and arrays_reach_the_worker(
        config(parallel_config=NS(distributed_executor_backend="uni"))
    )
    assert not arrays_reach_the_worker(config(use_v2_model_runner=True))  # V2 reads another field
    assert not arrays_reach_the_worker(config(parallel_config=NS(distributed_executor_backend="ray")))
    assert not arrays_reach_the_worker(config(model_config=NS(uses_mrope=True, logits_processors=None)))
    assert not arrays_reach_the_worker(config(model_config=NS(uses_mrope=False, logits_processors=["m:P"])))
    from vllm import SamplingParams

    assert array_safe(SamplingParams(max_tokens=1, repetition_penalty=1.3))
    assert not array_safe(SamplingParams(max_tokens=1, prompt_logprobs=1))
