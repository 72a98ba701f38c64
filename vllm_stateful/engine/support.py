"""Which engine setups sessions support, decided once at startup. No vLLM import.

Sessions reuse a finished request's blocks as-is and share a partial last
block through vLLM's copy-on-write, which is sound for full attention over
one KV cache group. Sliding-window, chunked-local, Mamba/hybrid models drop
or rewrite KV that a session would later read; several API servers would
split the sessions across session stores. Data-parallel ranks are supported:
each session is placed on one rank (``server/placement.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SUPPORTED_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")
_KINDS = {
    "SlidingWindowSpec": "sliding-window attention",
    "SlidingWindowMLASpec": "sliding-window attention",
    "ChunkedLocalAttentionSpec": "chunked-local attention",
    "MambaSpec": "Mamba (state-space) layers",
}


@dataclass(frozen=True)
class KVGroupShape:
    spec: str  # class name of the group's KVCacheSpec
    sliding_window: int | None = None
    attention_chunk_size: int | None = None


SUPPORTED = (
    "vllm-stateful supports full-attention models with one KV cache group, prefix caching on, "
    "and one API server (--api-server-count 1; any --data-parallel-size)"
)


def unsupported_reason(
    groups: Sequence[KVGroupShape],
    prefix_caching: bool,
    api_server_count: int = 1,
) -> str | None:
    """Why this setup cannot run sessions, or None when it can."""
    if len(groups) != 1:
        return f"{SUPPORTED}; this model has {len(groups)} KV cache groups (hybrid attention)"
    (group,) = groups
    if group.spec not in SUPPORTED_SPECS:
        kind = _KINDS.get(group.spec, "a cache layout sessions cannot reuse")
        return f"{SUPPORTED}; this model uses {kind} ({group.spec})"
    if group.sliding_window or group.attention_chunk_size:
        return f"{SUPPORTED}; this model uses sliding-window or chunked-local attention"
    if not prefix_caching:
        return f"{SUPPORTED}; remove --no-enable-prefix-caching (sessions reuse blocks through it)"
    if api_server_count > 1:
        return f"{SUPPORTED}; --api-server-count is {api_server_count}"
    return None
