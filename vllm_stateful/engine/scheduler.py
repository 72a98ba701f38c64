"""vLLM's scheduler, plus session KV that stays pinned between requests.

Written against vLLM 0.32.0 (``vllm/v1/core/sched/scheduler.py``). Three
overrides, each around ``super()``:

* ``_get_local_prefix_cache_hit`` -- a request carrying a verified session
  tag (see ``request_tags``) adopts the session's pinned blocks for the
  longest common prefix of its prompt and the session's tokens, including the
  partial last block. vLLM's own copy-on-write for partial hits
  (``SingleTypeKVCacheManager._apply_cow``) gives the request a private copy
  of that block, so nothing is recomputed and pinned blocks are never written.
* ``add_request`` / ``_free_request`` -- when a committing session request
  *finishes normally* (stopped, length-capped, repetition), its blocks become
  the session's pinned KV, covering every token whose KV is known to be
  written (all but the last sampled token). Aborted or failed requests never
  pin, and neither does a request admitted before the session's last sync or
  release or before a KV drop (``SessionControl.may_pin``): nothing the API
  server rolled back or closed can re-appear in the engine, and no KV from
  before a weight update is pinned.
* ``schedule`` -- work classes (``work_classes``): the step's queues are
  ordered by class (session turns and queries, plain traffic, ingestion,
  flash), lower classes are held out of the step or given a smaller token
  budget as ``StepPolicy`` decides, vLLM's own ``schedule()`` runs on the
  rest, and everything is put back.
* ``_get_local_prefix_cache_hit`` also asks vLLM's prefix cache and keeps the
  longer hit, so a session request reuses blocks other sessions computed
  (a shared system prompt is computed once); pinning keeps one block per
  content (``SessionPins.pin``).
* ``add_request`` / ``update_from_output`` -- a request whose tag references
  the session's pinned prefix (``prefix_refs``) gets the pinned tokens and
  their block hashes spliced in front of its prompt before vLLM queues it; a
  reference the pin no longer satisfies finishes the request with ``error``
  before it runs (the API server resends it whole), its output emitted with
  the next step's.
* ``reset_prefix_cache`` -- every cache reset vLLM performs (``/reset_prefix_cache``,
  ``pause(clear_cache)``, ``sleep`` level >= 1, releasing KV memory) first
  releases all pinned sessions, which become ``cold`` (their tokens stay in
  the API server and are re-prefilled on next use). Stale KV is never served.

Session bookkeeping errors are logged and counted, never raised into vLLM's
step loop: a fault in the plugin degrades one request to a recompute, it does
not stop the engine. Session control from the API server arrives through
``handle_stateful_call`` (see ``vllm_stateful.plugin`` and ``control``), on
the engine-core thread between steps.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.control import SessionControl
from vllm_stateful.engine.prefix_refs import (
    Spliced,
    array_safe,
    arrays_reach_the_worker,
    count_sent_only,
    prompt_array,
    prompt_head,
    splice,
    unresolved_reason,
)
from vllm_stateful.engine.request_tags import REF_KEY, UNRESOLVED_STOP_REASON, SessionTag, read_tag
from vllm_stateful.engine.session_pins import SessionPins
from vllm_stateful.engine.support import KVGroupShape, unsupported_reason
from vllm_stateful.engine.work_classes import ShareConfig, StepPolicy, WorkClass, marked_class

logger = init_logger(__name__)

# Finished statuses whose KV is complete and which the API server may commit.
PINNABLE = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_REPETITION)
STAMP_ATTR = "_vllm_stateful_stamp"
CLASS_ATTR = "_vllm_stateful_class"
LOOKUP_ATTR = "_vllm_stateful_lookup"
SPLICED_ATTR = "_vllm_stateful_spliced"
COUNTED_ATTR = "_vllm_stateful_counted"
PROMPT_HEAD_ATTR = "_vllm_stateful_prompt_head"
# on a SchedulerOutput of a bounded ingestion step: (perf_counter at its scheduling, its tokens)
BOUNDED_STEP_ATTR = "_vllm_stateful_bounded_step"


def work_class(request: Request) -> WorkClass:
    return getattr(request, CLASS_ATTR, WorkClass.PLAIN)


def step_demand(request: Request) -> int:
    """Tokens a running request asks for in the next step (vLLM's own formula, before caps)."""
    return max(0, request.num_tokens_with_spec + request.num_output_placeholders - request.num_computed_tokens)


class StatefulSchedulerMixin:
    """Session pinning on top of a vLLM ``Scheduler`` (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        groups = [
            KVGroupShape(
                type(g.kv_cache_spec).__name__,
                getattr(g.kv_cache_spec, "sliding_window", None),
                getattr(g.kv_cache_spec, "attention_chunk_size", None),
            )
            for g in self.kv_cache_config.kv_cache_groups
        ]
        reason = unsupported_reason(
            groups,
            prefix_caching=bool(self.cache_config.enable_prefix_caching),
        )
        if reason:
            raise ValueError(reason)
        self.session_pins = SessionPins(
            self.kv_cache_manager.block_pool, self.kv_cache_manager.coordinator.single_type_managers[0].block_size
        )
        self.session_control = SessionControl(self)
        config = StatefulConfig.from_additional_config(self.vllm_config.additional_config)
        share = ShareConfig(
            config.ingest_share_tokens,
            config.max_ingest_hold_steps,
            config.ingest_yield_steps,
            config.ingest_step_tokens,
            config.ingest_step_target_ms / 1000.0,
        )
        self.step_policy = StepPolicy(share, self.session_control.counters)
        self._last_step_start: float | None = None
        # requests finished for an unresolved prefix reference, whose outputs go with the next step's
        self._unresolved: list[Request] = []
        # pins keep the pinning request's block hashes when vLLM hashes at the KV block size
        self._keeps_hashes = getattr(self, "hash_block_size", None) == self.session_pins.block_size
        self._array_prompts = arrays_reach_the_worker(self.vllm_config)
        logger.info(
            "vllm-stateful scheduler active (block size %d); the HTTP session routes also need "
            "VLLM_PLUGINS to name 'stateful' (vllm-stateful serve sets it)",
            self.session_pins.block_size,
        )

    # --- vLLM overrides -------------------------------------------------------

    def add_request(self, request: Request) -> None:
        tag = self._session_tag(request, count_forged=True)
        params = request.sampling_params
        # a prompt that leaves out a referenced prefix never runs as it is: unverified, it is refused
        resolved = not (params is not None and params.extra_args and REF_KEY in params.extra_args)
        if tag is not None:
            setattr(request, STAMP_ATTR, self.session_control.stamp(tag.key))
            if tag.prefix is not None:
                resolved = self._splice_prefix(request, tag)
        klass = marked_class(params.extra_args if params else None, tag is not None)
        setattr(request, CLASS_ATTR, klass)
        super().add_request(request)
        self.step_policy.arrived(request.request_id, klass)
        if not resolved:  # finished before it runs: it holds only the tokens after its reference
            self.finish_requests(request.request_id, RequestStatus.FINISHED_ERROR)
            self._unresolved.append(request)

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> dict[int, EngineCoreOutputs]:
        bounded = getattr(scheduler_output, BOUNDED_STEP_ATTR, None)
        if bounded is not None:  # a bounded ingestion step's wall time, for the step's time target
            started, tokens = bounded
            self.step_policy.bounded_step_took(tokens, time.perf_counter() - started)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        refused, self._unresolved = self._unresolved, []
        for request in refused:
            out = EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=request.get_finished_reason(),
                stop_reason=UNRESOLVED_STOP_REASON,
                events=request.take_events(),
                trace_headers=request.trace_headers,
            )
            batch = outputs.get(request.client_index)
            if batch is None:
                outputs[request.client_index] = EngineCoreOutputs(outputs=[out])
            else:
                batch.outputs.append(out)
        return outputs

    def schedule(self, *args: Any, **kwargs: Any):
        if self._pause_state == PauseState.PAUSED_ALL:  # vLLM schedules nothing: not a step of the policy
            self._last_step_start = None
            return super().schedule(*args, **kwargs)
        started = time.perf_counter()
        counters = self.session_control.counters
        if self._last_step_start is not None:
            counters["step_s"] += started - self._last_step_start
        plan = self.step_policy.plan(
            self.running,
            self.waiting,
            work_class,
            step_demand,
            self.max_num_scheduled_tokens,
            other_waiting=self.kv_holding_waiting,
            admittable=self._admittable,
            free_slots=len(self.running) < self.max_num_running_reqs,
            may_hold_running=self._kv_room_to_hold(),
            may_chunk=self.scheduler_config.enable_chunked_prefill,
        )
        held_running, held_waiting = plan.held_running, plan.held_waiting
        # held running requests keep their model-runner slots: vLLM may admit only into the rest
        slots = len(held_running)
        if held_running:
            held_ids = {id(r) for r in held_running}
            self.running = [r for r in self.running if id(r) not in held_ids]
            self.max_num_running_reqs -= slots
            self.max_num_active_reqs -= slots
        if held_waiting:
            self.waiting.remove_requests(held_waiting)
        self.running.sort(key=work_class)  # stable: by class, then vLLM's order
        self._order_waiting()
        full_budget = self.max_num_scheduled_tokens
        if plan.token_budget is not None:
            self.max_num_scheduled_tokens = plan.token_budget
        own_cap = self.scheduler_config.long_prefill_token_threshold
        if plan.prefill_cap is not None:
            self.scheduler_config.long_prefill_token_threshold = (
                plan.prefill_cap if own_cap <= 0 else min(own_cap, plan.prefill_cap)
            )
        try:
            output = super().schedule(*args, **kwargs)
            self._count_sent_only(output.scheduled_new_reqs)
            self._hand_over_prompt_arrays(output.scheduled_new_reqs)
        finally:
            self.max_num_scheduled_tokens = full_budget
            self.scheduler_config.long_prefill_token_threshold = own_cap
            if held_running:
                self.max_num_running_reqs += slots
                self.max_num_active_reqs += slots
                self.running.extend(held_running)
            if held_waiting:
                self.waiting.prepend_requests(reversed(held_waiting))  # back at the head, in order
        try:
            if self.step_policy.after_step(plan, output.num_scheduled_tokens, self._class_of_id):
                setattr(output, BOUNDED_STEP_ATTR, (started, output.total_num_scheduled_tokens))
        except Exception:
            self.session_control.fault("step accounting", "-")
        now = time.perf_counter()
        counters["schedule_s"] += now - started
        counters["steps"] += 1
        # a step's wall time runs from one schedule() to the next while work is scheduled
        self._last_step_start = started if output.num_scheduled_tokens else None
        return output

    def _count_sent_only(self, scheduled_new: list[Any]) -> None:
        """Spliced requests' prefill stats over the tokens they carried (``prefix_refs``), once."""
        for new in scheduled_new:
            request = self.requests.get(new.req_id)
            spliced = getattr(request, SPLICED_ATTR, None)
            stats = getattr(request, "prefill_stats", None)
            if spliced is None or stats is None or getattr(request, COUNTED_ATTR, False):
                continue
            try:
                count_sent_only(stats, spliced)
            except Exception:
                self.session_control.fault("prefill stats", new.req_id)
            setattr(request, COUNTED_ATTR, True)

    def _keep_prompt_head(self, request: Request, pinned: Any, ref: Any) -> None:
        """Keep a view of the pin's array over the referenced prefix (``prefix_refs.prompt_head``: no
        copy while the request waits), where every reader of the prompt in the worker takes an array:
        otherwise, or on any failure, the prompt goes as vLLM's list."""
        params = request.sampling_params
        if not self._array_prompts or (params is not None and not array_safe(params)):
            return
        try:
            setattr(request, PROMPT_HEAD_ATTR, prompt_head(pinned, ref))
        except Exception:
            self.session_control.fault("prompt array", request.request_id)

    def _hand_over_prompt_arrays(self, scheduled_new: list[Any]) -> None:
        """A spliced request's prompt goes to the worker as one array (same tokens; the engine's request
        keeps its list), once: a preempted request resumes as vLLM sends it. The array is the kept head
        and the list's tokens after it: the head equals the request's prompt up to there (the splice), and
        vLLM only ever sends the request's prompt or a prefix of it (KV connector back-off)."""
        for new in scheduled_new:
            request = self.requests.get(new.req_id)
            head = getattr(request, PROMPT_HEAD_ATTR, None)
            if head is None:
                continue
            try:
                delattr(request, PROMPT_HEAD_ATTR)
                sent = new.prompt_token_ids
                if sent is not None and len(sent) >= len(head):
                    new.prompt_token_ids = prompt_array(head, sent[len(head) :])
                    self.session_control.counters["prompts_sent_as_arrays"] += 1
            except Exception:
                self.session_control.fault("prompt array", new.req_id)

    def _order_waiting(self) -> None:
        """FCFS waiting queue in class order (stable). A priority queue keeps vLLM's order:
        the clients' explicit priorities win there."""
        if self.policy != SchedulingPolicy.FCFS or len(self.waiting) < 2:
            return
        queued = list(self.waiting)
        ordered = sorted(queued, key=work_class)
        if any(a is not b for a, b in zip(queued, ordered)):
            self.waiting.remove_requests(queued)
            for request in ordered:
                self.waiting.add_request(request)

    def _admittable(self, request: Request) -> bool:
        """vLLM could admit this waiting request now (it is not waiting on something else)."""
        return not self._is_blocked_waiting_status(request.status) and request not in self.deferred_waiting

    def _kv_room_to_hold(self) -> bool:
        """Enough free blocks for a full step of the others plus one block each: only then may running
        requests be held out of vLLM's reach (it cannot preempt a held request)."""
        bs = self.session_pins.block_size
        need = -(-self.max_num_scheduled_tokens // bs) + len(self.running)
        return self.kv_cache_manager.block_pool.get_num_free_blocks() >= need

    def class_depths(self) -> dict[str, int]:
        """Requests per queue and work class, e.g. ``{"waiting_ingest": 2}``."""
        depth: dict[str, int] = {}
        for queue, requests in (("running", self.running), ("waiting", self.waiting)):
            for request in requests:
                name = f"{queue}_{work_class(request).label}"
                depth[name] = depth.get(name, 0) + 1
        return depth

    def _class_of_id(self, request_id: str) -> WorkClass:
        request = self.requests.get(request_id)
        return WorkClass.PLAIN if request is None else work_class(request)

    def _get_local_prefix_cache_hit(self, request: Request):
        tag = self._session_tag(request)
        if tag is None:
            return super()._get_local_prefix_cache_hit(request)
        cached = None
        try:
            spliced: Spliced | None = getattr(request, SPLICED_ATTR, None)
            pinned = self.session_pins.get(tag.key)
            unchanged = spliced is not None and pinned is not None and pinned.serial == spliced.serial
            hit = self.session_pins.hit(tag.key, request.all_token_ids, known_equal=spliced.tokens if unchanged else 0)
            own = 0 if hit is None else hit.num_tokens
            # vLLM's prefix cache hits whole blocks before the last token: a longer own hit needs no lookup
            bs = self.session_pins.block_size
            if not (unchanged and self.connector is None and own >= (request.num_tokens - 1) // bs * bs):
                cached = super()._get_local_prefix_cache_hit(request)
            vllm_hit = own if cached is None else cached[1]
            # counted once per admission attempt (a request vLLM cannot admit yet is looked up again)
            count = getattr(request, LOOKUP_ATTR, None) != request.num_preemptions
            setattr(request, LOOKUP_ATTR, request.num_preemptions)
            counters = self.session_control.counters if count else Counter()
            if hit is not None and own >= vllm_hit:
                blocks = self.kv_cache_manager.create_kv_cache_blocks((list(hit.blocks),))
                counters["reused_tokens"] += own
                return blocks, own, 0, False
            # blocks other requests computed (a shared prefix, another session's identical content)
            counters["reused_tokens"] += own
            counters["shared_prefix_tokens"] += vllm_hit - own
        except Exception:
            self.session_control.fault("hit", request.request_id)
        return super()._get_local_prefix_cache_hit(request) if cached is None else cached

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        tag = self._session_tag(request)
        if tag is not None and tag.commit and request.status in PINNABLE:
            try:
                if self.session_control.may_pin(tag.key, getattr(request, STAMP_ATTR, None)):
                    self._pin_finished_request(tag.key, request)
            except Exception:
                self.session_control.fault("pin", request.request_id)
        self.step_policy.forget(request.request_id)
        return super()._free_request(request, delay_free_blocks)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        if reset_running_requests or not self.running:
            self.session_control.drop_all("kv_cache_reset")
        return super().reset_prefix_cache(reset_running_requests, reset_connector)

    def shutdown(self) -> None:
        released = self.session_pins.release_all()
        if released:
            logger.info("vllm-stateful released %d pinned blocks at shutdown", released)
        super().shutdown()

    # --- session state ----------------------------------------------------------

    def _splice_prefix(self, request: Request, tag: SessionTag) -> bool:
        """Resolve ``tag.prefix`` into ``request``'s prompt (``prefix_refs``); False when it cannot be."""
        assert tag.prefix is not None
        try:
            pinned = self.session_pins.get(tag.key)
            shared = self.session_control.referencable_tokens(tag.key, tag.prefix.generation)
            reason = unresolved_reason(tag.prefix, pinned, shared, request, self.max_model_len)
            if reason is None and pinned is not None:
                setattr(request, SPLICED_ATTR, splice(request, pinned, tag.prefix, self.session_pins.block_size))
                self._keep_prompt_head(request, pinned, tag.prefix)
                self.session_control.counters["referenced_tokens"] += tag.prefix.tokens
                return True
            self.session_control.unresolved(request.request_id, reason or "no pin")
        except Exception:
            self.session_control.fault("prefix reference", request.request_id)
        return False

    def _session_tag(self, request: Request, count_forged: bool = False) -> SessionTag | None:
        params = request.sampling_params
        tag, forged = read_tag(params.extra_args if params else None, self.session_control.secret)
        if forged and count_forged:
            self.session_control.forged(request.request_id)
        return tag

    def _pin_finished_request(self, key: str, request: Request) -> None:
        # Every position before the last token has been fed to the model; the
        # last sampled token has not (or not certainly, with async scheduling).
        kv_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        if kv_tokens <= 0:
            return
        (blocks,) = self.kv_cache_manager.get_blocks(request.request_id).blocks
        if len(blocks) * self.session_pins.block_size < kv_tokens:
            return  # never allocated: nothing new to keep
        hashes = request.block_hashes if self._keeps_hashes else None
        self.session_pins.pin(key, request.all_token_ids[:kv_tokens], blocks, hashes, request.cache_salt)
        self.session_control.counters["turns"] += 1

    def handle_stateful_call(self, op: str, args: dict[str, Any]) -> Any:
        """Session control from the API server; runs on the engine-core thread."""
        return self.session_control.handle(op, args)


class StatefulScheduler(StatefulSchedulerMixin, AsyncScheduler):
    """The scheduler to name in ``--scheduler-cls`` (async scheduling, vLLM's default)."""


class StatefulSyncScheduler(StatefulSchedulerMixin, Scheduler):
    """For engines run with ``--no-async-scheduling``."""
