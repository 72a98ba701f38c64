"""vLLM's scheduler, plus session KV that stays pinned between requests.

Written against vLLM 0.32.0 (``vllm/v1/core/sched/scheduler.py``). Two
overrides, both around ``super()``:

* ``_get_local_prefix_cache_hit`` -- a request tagged with a session adopts
  the session's pinned blocks for the longest common prefix of its prompt and
  the session's tokens, including the partial last block. vLLM's own
  copy-on-write for partial hits (``SingleTypeKVCacheManager._apply_cow``)
  gives the request a private copy of that block, so nothing is recomputed
  and the session's blocks are never written.
* ``_free_request`` -- when a committing session request finishes (or is
  aborted), its blocks become the session's pinned KV, covering every token
  whose KV is known to be written (all but the last sampled token).

Everything else (queues, preemption, chunked prefill) is vLLM's. Preemption
frees a request's references, never a session's, so pinned KV survives it.
Session control from the API server arrives through ``handle_stateful_call``
(see ``vllm_stateful.plugin``), on the engine-core thread between steps.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_stateful.engine.request_tags import session_tag
from vllm_stateful.engine.session_pins import SessionPins

logger = init_logger(__name__)


class StatefulSchedulerMixin:
    """Session pinning on top of a vLLM ``Scheduler`` (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(
                f"vllm-stateful supports models with one KV cache group (full attention); this model has {len(groups)}"
            )
        if not self.cache_config.enable_prefix_caching:
            raise ValueError(
                "vllm-stateful needs prefix caching (it reuses blocks through vLLM's "
                "prefix-hit path); remove --no-enable-prefix-caching"
            )
        self.session_pins = SessionPins(
            self.kv_cache_manager.block_pool, self.kv_cache_manager.coordinator.single_type_managers[0].block_size
        )
        self.session_counters = {"turns": 0, "reused_tokens": 0}
        logger.info(
            "vllm-stateful scheduler active (block size %d); the HTTP session routes also need "
            "VLLM_PLUGINS to name 'stateful' (vllm-stateful serve sets it)",
            self.session_pins.block_size,
        )

    # --- vLLM overrides -------------------------------------------------------

    def _get_local_prefix_cache_hit(self, request: Request):
        tag = session_tag(request.sampling_params.extra_args if request.sampling_params else None)
        if tag is not None:
            hit = self.session_pins.hit(tag.session_id, request.all_token_ids)
            if hit is not None:
                blocks = self.kv_cache_manager.create_kv_cache_blocks((list(hit.blocks),))
                self.session_counters["reused_tokens"] += hit.num_tokens
                return blocks, hit.num_tokens, 0, False
        return super()._get_local_prefix_cache_hit(request)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        tag = session_tag(request.sampling_params.extra_args if request.sampling_params else None)
        if tag is not None and tag.commit:
            self._pin_finished_request(tag.session_id, request)
        return super()._free_request(request, delay_free_blocks)

    def shutdown(self) -> None:
        released = self.session_pins.release_all()
        if released:
            logger.info("vllm-stateful released %d pinned blocks at shutdown", released)
        super().shutdown()

    # --- session state ----------------------------------------------------------

    def _pin_finished_request(self, session_id: str, request: Request) -> None:
        # Every position before the last token has been fed to the model; the
        # last sampled token has not (or not certainly, with async scheduling).
        kv_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        if kv_tokens <= 0:
            return
        (blocks,) = self.kv_cache_manager.get_blocks(request.request_id).blocks
        if len(blocks) * self.session_pins.block_size < kv_tokens:
            return  # never allocated (aborted before admission): nothing new to keep
        self.session_pins.pin(session_id, request.all_token_ids[:kv_tokens], blocks)
        self.session_counters["turns"] += 1

    def handle_stateful_call(self, op: str, args: dict[str, Any]) -> Any:
        """Session control from the API server; runs on the engine-core thread.

        Ops: ``info``; ``session`` {session_id}; ``sync`` {session_id, max_tokens}
        (drop pinned KV past ``max_tokens``, the API server's committed history);
        ``release`` {session_id}; ``integrity``. Unknown ops raise ValueError.
        """
        pins = self.session_pins
        if op == "info":
            return {
                "block_size": pins.block_size,
                "num_blocks": self.kv_cache_manager.block_pool.num_gpu_blocks,
                "free_blocks": self.kv_cache_manager.block_pool.get_num_free_blocks(),
                "pinned_blocks": pins.num_pinned_blocks(),
                "sessions": len(pins.session_ids()),
                "max_model_len": self.max_model_len,
                **self.session_counters,
            }
        if op == "session":
            return self._session_info(args["session_id"])
        if op == "sync":
            pins.truncate(args["session_id"], int(args["max_tokens"]))
            return self._session_info(args["session_id"])
        if op == "release":
            return {"freed_blocks": pins.release(args["session_id"])}
        if op == "integrity":
            return {
                "problems": pins.check_integrity(),
                "pinned_blocks": pins.num_pinned_blocks(),
                "sessions": pins.session_ids(),
                "free_blocks": self.kv_cache_manager.block_pool.get_num_free_blocks(),
                "running": len(self.running),
                "waiting": len(self.waiting),
            }
        raise ValueError(f"unknown stateful op {op!r}")

    def _session_info(self, session_id: str) -> dict[str, Any]:
        pinned = self.session_pins.get(session_id)
        if pinned is None:
            return {"pinned_tokens": 0, "pinned_blocks": 0}
        return {"pinned_tokens": pinned.num_tokens, "pinned_blocks": len(pinned.blocks)}


class StatefulScheduler(StatefulSchedulerMixin, AsyncScheduler):
    """The scheduler to name in ``--scheduler-cls`` (async scheduling, vLLM's default)."""


class StatefulSyncScheduler(StatefulSchedulerMixin, Scheduler):
    """For engines run with ``--no-async-scheduling``."""
