"""Session control ops, run on the engine-core thread between scheduler steps.

The API server reaches these through ``EngineCore.stateful_call(op, args)``
(see ``vllm_stateful.plugin``). Every op is idempotent and keyed by a session
incarnation's key. Ops:

* ``handshake`` {secret} -- set the tag secret (once: a second API server
  attaching to the same engine is refused, see ``engine/support.py``).
* ``info`` -- pool and pin totals, fragmentation, queue depth per work class,
  counters, and ``kv_epoch`` (bumped every time all pins are dropped), which
  the API server polls to notice drops.
* ``sync`` {key, keep_tokens} -- trim the session's pin to its first
  ``keep_tokens`` tokens (the API server's committed history that the engine
  computed); returns the pin's tokens and blocks and the session's sync
  ``generation`` (which a prefix reference names, see ``prefix_refs``). Requests of the session
  admitted before the sync can no longer pin (``may_pin``).
* ``release`` {key} -- drop the session's pins for good; returns the freed blocks.
* ``leave`` {key} -- drop the session's pin on this data-parallel rank (it moved to
  another); unlike ``release`` it may pin here again later.
* ``fork`` {key, new_key} -- pin the session's blocks for a new session too: one
  more reference on each, no block allocated or copied (the partial last block
  is copied on write when either session grows, as for every pinned block).
* ``pins`` -- key -> [tokens, blocks] for every pinned session.
* ``integrity`` {digests} -- ref-count and shape checks, optionally with a
  digest of each session's pinned tokens and its block ids (O(tokens): for
  tests and operators), and the waits of the last admitted foreground requests.
* ``drop_all`` {reason} -- release every pin (weight updates; see plugin).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

from vllm_stateful.engine.session_pins import token_digest

logger = init_logger(__name__)

_WARN_EVERY_S = 10.0
# Released keys remembered, so that a request finishing after its session's
# release never pins again (keys are never reused; this bounds the memory).
_RELEASED_KEYS_KEPT = 65536
# Syncs remembered per session for prefix references (``referencable_tokens``); a reference older
# than that many syncs is refused and sent again whole.
_SYNCS_KEPT = 32


@dataclass(frozen=True)
class Stamp:
    """What a session request saw when the engine accepted it."""

    kv_epoch: int
    generation: int


class SessionControl:
    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.pins = scheduler.session_pins
        # this engine's data-parallel rank (vLLM sets data_parallel_index per engine process)
        parallel = getattr(getattr(scheduler, "vllm_config", None), "parallel_config", None)
        self.rank: int = int(getattr(parallel, "data_parallel_index", 0) or 0)
        self.secret: bytes | None = None
        self.kv_epoch = 0
        self.counters: Counter[str] = Counter()
        self._last_warning: dict[str, float] = {}
        # bumped by every sync of a key: a pin may only come from a request admitted after the last one
        self._generation: dict[str, int] = {}
        self._released: OrderedDict[str, None] = OrderedDict()
        # per key, its last syncs: (the generation each one made, the tokens it kept)
        self._syncs: dict[str, deque[tuple[int, int]]] = {}

    # --- which finished requests may pin -----------------------------------------------

    def stamp(self, key: str) -> Stamp:
        return Stamp(self.kv_epoch, self._generation.get(key, 0))

    def may_pin(self, key: str, stamp: Stamp | None) -> bool:
        """Only a request admitted after the session's last sync, release and KV drop may pin:
        a rollback or close that reached the engine first is never undone by a late finish,
        and KV from before a cache reset or weight update is never pinned again."""
        return (
            stamp is not None
            and key not in self._released
            and stamp.kv_epoch == self.kv_epoch
            and stamp.generation == self._generation.get(key, 0)
        )

    # --- events from the scheduler -------------------------------------------------

    def generation(self, key: str) -> int:
        """How many times the session was synced (or left) here."""
        return self._generation.get(key, 0)

    def referencable_tokens(self, key: str, generation: int) -> int:
        """How many leading tokens of the history the API server held at sync ``generation`` of the
        session are still the leading tokens of its history now, hence of its pin (``prefix_refs``).

        Every sync trims the pin to the tokens the API server's new history shares with the old
        one's (a commit keeps all of them and adds its own, a rollback or rewind keeps fewer), so
        that is the fewest tokens any sync since ``generation`` kept; unbounded when there was none,
        0 when some of them are no longer remembered (or ``generation`` is not one of this key's)."""
        current = self.generation(key)
        if generation == current:
            return 1 << 62
        newer = [kept for made, kept in self._syncs.get(key, ()) if made > generation]
        if generation > current or len(newer) != current - generation:
            return 0
        return min(newer)

    def _synced(self, key: str, kept: int) -> None:
        self._generation[key] = self._generation.get(key, 0) + 1
        self._syncs.setdefault(key, deque(maxlen=_SYNCS_KEPT)).append((self._generation[key], kept))

    def unresolved(self, request_id: str, reason: str) -> None:
        self.counters["unresolved_references"] += 1
        logger.debug("vllm-stateful: request %s references a pin it cannot use (%s); resent whole", request_id, reason)

    def forged(self, request_id: str) -> None:
        self.counters["forged_tags"] += 1
        self._warn("forged", "ignored a session tag that the plugin did not sign (request %s)", request_id)

    def fault(self, where: str, request_id: str) -> None:
        self.counters["faults"] += 1
        logger.exception(
            "vllm-stateful: session %s failed for request %s; it runs without pinned KV", where, request_id
        )

    def drop_all(self, reason: str, evict: bool = False) -> int:
        """Release every pin; the API server sees ``kv_epoch`` change and marks sessions cold.

        ``evict``: also empty vLLM's prefix cache (after a weight update every
        cached block is stale), so no request can hit KV computed before now."""
        sessions = len(self.pins.session_ids())
        released = self.pins.release_all()
        self.kv_epoch += 1  # requests admitted before now may not pin
        if evict:  # the whole prefix cache: blocks computed before now are stale
            pool = self.scheduler.kv_cache_manager.block_pool
            pool.evict_blocks(set(range(pool.num_gpu_blocks)))
        if sessions:
            self.counters[f"dropped_{reason}"] += sessions
            logger.warning("vllm-stateful: %s released the KV of %d sessions (%d blocks)", reason, sessions, released)
        return released

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(kind, 0.0) >= _WARN_EVERY_S:
            self._last_warning[kind] = now
            logger.warning("vllm-stateful: " + msg, *args)

    # --- ops from the API server ------------------------------------------------------

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown stateful op {op!r}")
        return handler(**args)

    def op_handshake(self, secret: str) -> dict[str, Any]:
        value = bytes.fromhex(secret)
        if self.secret is not None and self.secret != value:
            raise RuntimeError(
                "another API server is already attached to this engine; vllm-stateful keeps sessions in one "
                "API server process (run with --api-server-count 1)"
            )
        self.secret = value
        return self.op_info()

    def op_info(self) -> dict[str, Any]:
        pool = self.scheduler.kv_cache_manager.block_pool
        return {
            "rank": self.rank,
            "block_size": self.pins.block_size,
            "num_blocks": pool.num_gpu_blocks,
            "free_blocks": pool.get_num_free_blocks(),
            "pinned_blocks": self.pins.num_pinned_blocks(),
            "fragmentation": self.pins.fragmentation(),
            "sessions": len(self.pins.session_ids()),
            "max_model_len": self.scheduler.max_model_len,
            "kv_epoch": self.kv_epoch,
            "depth": self.scheduler.class_depths(),
            "token_budget": self.scheduler.max_num_scheduled_tokens,
            **self.counters,
        }

    def op_sync(self, key: str, keep_tokens: int) -> dict[str, int]:
        self.pins.truncate(key, int(keep_tokens))
        self._synced(key, int(keep_tokens))
        return self._pin_info(key)

    def op_leave(self, key: str) -> dict[str, int]:
        """The session moved to another data-parallel rank: drop its pin here; it may come back
        (unlike ``release``), and no request admitted before now pins it again."""
        freed = self.pins.release(key)
        self._synced(key, 0)
        return {"freed_blocks": freed, **self._pin_info(key)}

    def op_release(self, key: str) -> dict[str, int]:
        self._generation.pop(key, None)
        self._syncs.pop(key, None)
        self._released[key] = None
        while len(self._released) > _RELEASED_KEYS_KEPT:
            self._released.popitem(last=False)
        return {"freed_blocks": self.pins.release(key)}

    def op_fork(self, key: str, new_key: str) -> dict[str, int]:
        if new_key in self._released or self.pins.get(new_key) is not None:
            raise ValueError("fork target key is taken")
        pinned = self.pins.get(key)
        if pinned is not None and pinned.token_ids:
            self.pins.pin(new_key, pinned.token_ids, pinned.blocks, pinned.block_hashes, pinned.cache_salt)
        return self._pin_info(new_key)

    def op_pins(self) -> dict[str, list[int]]:
        return {key: [tokens, blocks] for key, (tokens, blocks) in self.pins.summary().items()}

    def op_integrity(self, digests: bool = False) -> dict[str, Any]:
        sessions = {
            key: {
                "tokens": p.num_tokens,
                "blocks": len(p.blocks),
                **({"digest": token_digest(p.token_ids), "block_ids": self.pins.block_ids(key)} if digests else {}),
            }
            for key in self.pins.session_ids()
            if (p := self.pins.get(key)) is not None
        }
        return {
            "problems": self.pins.check_integrity(),
            "pinned_blocks": self.pins.num_pinned_blocks(),
            "sessions": sessions,
            "free_blocks": self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_epoch": self.kv_epoch,
            "counters": dict(self.counters),
            "waits": list(self.scheduler.step_policy.waits),
        }

    def op_drop_all(self, reason: str) -> dict[str, int]:
        return {"freed_blocks": self.drop_all(reason, evict=True)}

    def _pin_info(self, key: str) -> dict[str, int]:
        pinned = self.pins.get(key)
        generation = self.generation(key)
        if pinned is None:
            return {"pinned_tokens": 0, "pinned_blocks": 0, "generation": generation}
        return {"pinned_tokens": pinned.num_tokens, "pinned_blocks": len(pinned.blocks), "generation": generation}
