"""Requests that reference their session's pinned prefix instead of carrying it.

A session request whose tag holds a ``PrefixRef(generation, tokens)`` arrives
with only the tokens after the session's first ``tokens`` pinned tokens: the
API server did not ship (and vLLM's input thread did not hash) a history the
engine already holds. Before vLLM's scheduler sees the request, ``splice``
puts the pinned tokens back in front of its prompt and gives it the prefix's
block hashes as the pinning request computed them, so only the sent tokens are
hashed. From then on the request is exactly the one vLLM would have built from
the whole prompt: same tokens, same block hashes, same length checks.

Why a reference is sound: the API server takes ``(generation, tokens)`` from
the engine's reply to the session's last ``sync`` together with the history it
builds the prompt on (``Session.pin_view``). Between two syncs of a session its
pin only grows by requests built on that history, or is dropped (cache reset,
weight update) and rebuilt from it; a sync trims it to the tokens the new
history shares with the old (a commit keeps them all). So the pin's first
``tokens`` tokens are the prompt's while every sync since ``generation`` kept
at least ``tokens`` (``SessionControl.referencable_tokens``): a query is not
refused because an append committed while it was on its way. Otherwise the
reference is *unresolved*: the request finishes with ``error`` before it runs
and the API server sends it again with its whole prompt.
No vLLM import at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_stateful.engine.request_tags import PrefixRef
from vllm_stateful.engine.session_pins import PinnedSession


@dataclass(frozen=True)
class Spliced:
    """Recorded on a spliced request: its first ``tokens`` tokens are those of the pin whose
    ``serial`` this is (``SessionPins.hit`` skips comparing them while the pin is unchanged)."""

    serial: int
    tokens: int


def unresolved_reason(
    ref: PrefixRef, pinned: PinnedSession | None, still_shared: int, request: Any, max_model_len: int
) -> str | None:
    """Why ``ref`` cannot be resolved against the session's pin now; None when it can.

    ``still_shared``: how many leading tokens of the history at the reference's sync generation
    the session's history still holds (``SessionControl.referencable_tokens``). A spliced prompt
    vLLM's input checks would have refused (``max_model_len``) is not resolved either: sent whole,
    it gets vLLM's own error."""
    if pinned is None:
        return "the session holds no pinned KV"
    if still_shared < ref.tokens:
        return f"the session was synced to {still_shared} tokens since the reference's generation {ref.generation}"
    if pinned.num_tokens < ref.tokens:
        return f"the pin holds {pinned.num_tokens} tokens, fewer than the {ref.tokens} referenced"
    if pinned.cache_salt != request.cache_salt:
        return "the pin was computed under another cache salt (tenant)"
    if request.num_output_tokens or request.prompt_embeds is not None or request.mm_features:
        return "only a plain token prompt can reference a pin"
    if ref.tokens + len(request.prompt_token_ids) >= max_model_len:
        return f"the spliced prompt would not fit the model's context of {max_model_len} tokens"
    return None


def splice(request: Any, pinned: PinnedSession, ref: PrefixRef, block_size: int) -> Spliced:
    """Make ``request`` (built by vLLM from the sent tokens) hold the pin's first ``ref.tokens``
    tokens followed by its own prompt, with the block hashes of the whole (``block_size``: vLLM's
    hash block size, the pins' block size). Precondition: ``unresolved_reason`` returned None."""
    from vllm.v1.utils import ConstantList

    prompt = pinned.token_ids[: ref.tokens] + list(request.prompt_token_ids)
    request.prompt_token_ids = prompt
    request.num_prompt_tokens = len(prompt)
    request._all_token_ids = prompt.copy()
    request.all_token_ids = ConstantList(request._all_token_ids)
    # the pin's hashes are the prefix's own (same salt: ``unresolved_reason``) unless an adapter is hashed in
    hashes = pinned.block_hashes if pinned.block_hashes is not None and request.lora_request is None else []
    request.block_hashes = list(hashes[: ref.tokens // block_size])
    request.update_block_hashes()
    return Spliced(pinned.serial, ref.tokens)


def arrays_reach_the_worker(vllm_config: Any) -> bool:
    """Whether a prompt array reaches only readers that take one: vLLM's V1 model runner (the V2 one reads
    the prompt from another field), through the multiprocessing or in-process executor (Ray's compiled
    graphs hand numpy arrays over zero-copy, and the worker keeps this one for the request's life), with no
    model whose positions are built from the prompt (M-RoPE) and no logits processor beyond vLLM's own
    (user ones and ``vllm.logits_processors`` plugins get the prompt and may treat it as a list)."""
    from importlib.metadata import entry_points

    model = vllm_config.model_config
    backend = vllm_config.parallel_config.distributed_executor_backend
    return (
        not getattr(vllm_config, "use_v2_model_runner", False)
        and backend in ("mp", "uni", None)
        and not model.uses_mrope
        and not model.logits_processors
        and not list(entry_points(group="vllm.logits_processors"))
    )


def array_safe(params: Any) -> bool:
    """Per request: not with prompt logprobs (read from the prompt as a tensor) or a thinking-token
    budget (its state compares prompt slices as lists)."""
    return params.prompt_logprobs is None and getattr(params, "thinking_token_budget", None) is None


def prompt_head(pinned: PinnedSession, ref: PrefixRef) -> Any:
    """The pin's first ``ref.tokens`` tokens as an int32 array view (no copy), or None when the pin keeps
    no array. A pin's array is never written (``SessionPins`` builds a new one for a new pin), so the
    view stays the request's prefix while it waits, whatever the session does meanwhile."""
    if pinned.token_array is None or len(pinned.token_array) < ref.tokens:
        return None
    return pinned.token_array[: ref.tokens]


def prompt_array(head: Any, sent: Sequence[int]) -> Any:
    """The spliced prompt (``head``, then ``sent``) as one int32 array. vLLM's scheduler output carries
    a new request's whole prompt to the model-runner worker, which pickles, unpickles and copies it
    into its input batch: O(history) per request as a list (~3 ms at 32k tokens on a 2-core CPU), one
    buffer copy each way as an array (``StatefulSchedulerMixin`` builds it when the request is first
    scheduled, and hands it over)."""
    import numpy as np

    return np.concatenate((head, np.asarray(sent, dtype=np.int32)))


def count_sent_only(stats: Any, spliced: Spliced) -> None:
    """vLLM's prefill stats of a spliced request, counted over the tokens the client's request
    carried: the API server's side of vLLM's metrics only knows those (its prompt length), so
    whole-prompt stats would report ``cached > prompt`` there. The spliced prefix leaves the
    prompt and the local cache hit alike; the computed tokens are unchanged. Stats not yet set
    over the whole prompt are left alone."""
    if stats.num_prompt_tokens < spliced.tokens:
        return
    take = min(spliced.tokens, stats.num_local_cached_tokens)
    stats.num_prompt_tokens -= spliced.tokens
    stats.num_local_cached_tokens -= take
    stats.num_cached_tokens -= take
    stats.num_computed_tokens = max(0, stats.num_prompt_tokens - stats.num_cached_tokens)
