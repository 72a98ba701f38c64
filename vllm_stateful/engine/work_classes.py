"""Which requests the engine may schedule in a step, and how much, by work class.

Every request belongs to one class (``WorkClass``), ranked:

  QUERY  -- a session's turn or read-only query (a request with a verified
            session tag, see ``request_tags``; a client cannot forge it)
  PLAIN  -- non-session traffic (stock vLLM requests on the same server)
  INGEST -- prefill-only ingestion: session content and appends
  FLASH  -- background re-answers of flash queries

INGEST and FLASH are marked by the plugin in ``SamplingParams.extra_args``
(``CLASS_KEY``). Those marks only lower a request's rank, so they need no
signature: a client that marks its own request only slows itself down.

Contract of ``StepPolicy.plan`` (one call per engine step, before vLLM's own
``schedule()``, which then runs unchanged on what is left):

* Order: running and waiting requests are visited by rank, then in vLLM's
  order (a stable sort). vLLM gives token budget in that order and preempts
  from the end, so flash and ingestion are also the first preempted.
* Admission step -- foreground (QUERY or PLAIN) can be admitted (it waits,
  is not blocked on something else, and a running slot is free): ingestion
  is held out of the step (running and waiting), so the foreground request
  is admitted in the next step; a request that arrives while an ingestion
  chunk runs waits for that chunk only.
* Yield step -- within the first ``ingest_yield_steps`` steps of a
  foreground burst (consecutive steps with foreground running or waiting for
  admission, the admission step included): ingestion is held, so a short
  answer decodes without ingestion in its steps. A burst that lasts longer (a
  long generation, back-to-back queries) then runs as with no yield steps.
  No yield step while KV blocks run low and ingestion is running (it could
  not be held): a share step caps it instead.
* Share step -- foreground runs or waits beside ingestion and no hold above
  applies: the step's token budget is cut to the running foreground's demand
  plus ``ingest_share_tokens``, and foreground still waiting for admission is
  held for this one step, so ingestion (running or waiting) gets its share.
* No admittable foreground: ingestion gets vLLM's whole token budget (prefill
  speed), at most ``ingest_step_tokens`` of it when that is set (the step's
  budget: running flash that cannot be held shares it), or the bound a
  wall-time target gives (``ingest_step``): a foreground request that
  arrives while an ingestion step runs waits for that step (and the one
  vLLM's async scheduling may already have scheduled), so its size bounds the
  wait. Neither this bound nor the cap below applies without chunked prefill.
* Bounds, both ways: ingestion is held at most ``max(max_ingest_hold_steps,
  ingest_yield_steps)`` steps in a row whatever the arrivals, so with work to
  do it receives ``ingest_share_tokens`` in at least one of every that many
  + 1 steps -- unless running foreground prefill itself fills the step's
  whole budget (vLLM serves the classes in order) -- and a foreground request
  waits at most one share step before its admission step.
* Priority inheritance: an ingestion batch sent while a turn or query of its
  session waits for it (read-your-writes) carries no ingestion mark: it runs
  in the query class. A batch already in the engine keeps its class.
* Flash runs on spare capacity: held whenever any other request exists.
* Progress: if a step that held anything scheduled nothing (e.g. the held
  requests hold the free KV blocks), the next step holds nothing.
* Held running requests keep their KV blocks and model-runner slots; the
  scheduler lowers vLLM's running-request limits by their number. vLLM cannot
  preempt a held request, so when KV blocks run low (``may_hold_running``
  false) running requests are not held: vLLM then preempts from the end of
  the class order, i.e. flash and ingestion first. An admission step then
  caps every request's new tokens at ``ingest_share_tokens`` instead
  (``StepPlan.prefill_cap``, vLLM's ``long_prefill_token_threshold`` for the
  step; vLLM's adaptive threshold, when on, raises it to a fair share of the
  budget), so the running ingestion leaves budget for the waiting foreground,
  which is admitted in the same step (its own first chunk capped too). Such a
  step counts toward the hold bound, so if the request still cannot be
  admitted (no blocks for it), steps alternate with share steps.

``StepPolicy.after_step`` records the outcome (per-class tokens, waits of
newly admitted requests in steps and seconds, held steps) in ``counters``.
No vLLM import: the scheduler passes its requests and callables; the
step-table tests pass plain objects.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from vllm_stateful.engine.ingest_step import IngestStepSizer

CLASS_KEY = "stateful_class"
FLASH = "flash"
INGEST = "ingest"


class WorkClass(IntEnum):
    QUERY = 0
    PLAIN = 1
    INGEST = 2
    FLASH = 3

    @property
    def label(self) -> str:
        return self.name.lower()


FOREGROUND = (WorkClass.QUERY, WorkClass.PLAIN)


def marked_class(extra_args: dict[str, Any] | None, has_session_tag: bool) -> WorkClass:
    """A request's class from the plugin's mark and whether its session tag verified."""
    mark = extra_args.get(CLASS_KEY) if extra_args else None
    if mark == FLASH:
        return WorkClass.FLASH
    if mark == INGEST:
        return WorkClass.INGEST
    return WorkClass.QUERY if has_session_tag else WorkClass.PLAIN


@dataclass(frozen=True)
class ShareConfig:
    """ingest_share_tokens: ingestion tokens in a share step (its minimum share, the most a foreground
    step carries). max_ingest_hold_steps: consecutive steps ingestion may be held for foreground
    admissions. ingest_yield_steps: the first steps of a foreground burst (foreground running or
    waiting), in which it is held (0: it shares every step beside running foreground).
    ingest_step_tokens: the most tokens of a step with ingestion and no foreground (0: vLLM's budget).
    ingest_step_target_s: that step's wall-time target (0: none), see ``ingest_step``."""

    ingest_share_tokens: int = 64
    max_ingest_hold_steps: int = 1
    ingest_yield_steps: int = 0
    ingest_step_tokens: int = 0
    ingest_step_target_s: float = 0.0

    def __post_init__(self) -> None:
        if self.ingest_share_tokens < 1 or self.max_ingest_hold_steps < 1:
            raise ValueError("ingest_share_tokens and max_ingest_hold_steps must be >= 1")
        if self.ingest_yield_steps < 0 or self.ingest_step_tokens < 0 or self.ingest_step_target_s < 0:
            raise ValueError("ingest_yield_steps, ingest_step_tokens and ingest_step_target_s must be >= 0")


@dataclass
class StepPlan:
    """What one step holds back and the token budget vLLM may use (None: unchanged)."""

    held_running: list[Any] = field(default_factory=list)
    held_waiting: list[Any] = field(default_factory=list)
    token_budget: int | None = None
    held_classes: frozenset[WorkClass] = frozenset()
    ingest_yielded: bool = False  # ingestion held by a yield step (not an admission step)
    prefill_cap: int | None = None  # the most new tokens any one request gets this step (None: vLLM's own)
    ingest_bounded: bool = False  # token_budget is the ingestion-alone bound (``ingest_step``)


@dataclass
class _Arrival:
    klass: WorkClass
    at_step: int
    at_time: float
    ingest_running: bool  # an ingestion was running when the request arrived
    ingest_tokens: int = 0  # ingestion tokens scheduled while it waited


class StepPolicy:
    """Per-step class policy (see module docstring)."""

    WAIT_RECORDS = 64

    def __init__(self, config: ShareConfig, counters: Counter[str], clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.counters = counters
        self.step_sizer = IngestStepSizer(
            config.ingest_step_tokens, config.ingest_step_target_s, config.ingest_share_tokens
        )
        self.clock = clock
        self.step = 0
        self._ingest_held_streak = 0
        self._fg_streak = 0  # consecutive earlier steps with foreground running or waiting (its burst so far)
        self._starved = False
        self._arrivals: dict[str, _Arrival] = {}
        self._ingest_running = False
        # the last admissions of foreground requests: what they waited for (tests, operators)
        self.waits: deque[dict[str, Any]] = deque(maxlen=self.WAIT_RECORDS)

    def arrived(self, request_id: str, klass: WorkClass) -> None:
        """A request entered vLLM's waiting queue."""
        self._arrivals[request_id] = _Arrival(klass, self.step, self.clock(), self._ingest_running)

    def forget(self, request_id: str) -> None:
        self._arrivals.pop(request_id, None)

    def plan(
        self,
        running: Iterable[Any],
        waiting: Iterable[Any],
        klass: Callable[[Any], WorkClass],
        demand: Callable[[Any], int],
        token_budget: int,
        other_waiting: Iterable[Any] = (),
        admittable: Callable[[Any], bool] = lambda r: True,
        free_slots: bool = True,
        may_hold_running: bool = True,
        may_chunk: bool = True,
    ) -> StepPlan:
        """The step's holds and budget. ``demand(request)``: tokens a running request wants this
        step; ``other_waiting``: queues vLLM admits from besides ``waiting`` (they only keep flash
        back); ``admittable(request)``: a waiting request vLLM could admit now (not blocked on a
        grammar, remote KV or streaming input); ``free_slots``: a running slot is free;
        ``may_hold_running``: enough free KV blocks to keep held running requests out of reach;
        ``may_chunk``: vLLM splits prompts into chunks (without chunked prefill a prompt larger than
        a step's budget is never admitted, so no bounded step and no cap)."""
        running, waiting, other_waiting = list(running), list(waiting), list(other_waiting)
        run_cls = [klass(r) for r in running]
        wait_cls = [klass(r) for r in waiting]
        fg_waiting = free_slots and any(c in FOREGROUND and admittable(r) for r, c in zip(waiting, wait_cls))
        fg_running = any(c in FOREGROUND for c in run_cls)
        ingest = WorkClass.INGEST in run_cls or WorkClass.INGEST in wait_cls
        others = run_cls + wait_cls + [klass(r) for r in other_waiting]
        held: set[WorkClass] = set()
        budget = cap = None
        bounded = False
        held_fg_waiting: list[Any] = []
        cfg = self.config
        fg_active = fg_running or fg_waiting
        yielding = fg_active and self._fg_streak < cfg.ingest_yield_steps  # early in a foreground burst
        self._fg_streak = self._fg_streak + 1 if fg_active else 0
        if not may_hold_running and WorkClass.INGEST in run_cls:
            yielding = False  # its running ingestion cannot be held: a share step caps it instead
        admission = fg_waiting and self._ingest_held_streak < cfg.max_ingest_hold_steps
        may_hold = self._ingest_held_streak < max(cfg.max_ingest_hold_steps, cfg.ingest_yield_steps)
        if self._starved:
            return StepPlan()
        if any(c != WorkClass.FLASH for c in others):
            held.add(WorkClass.FLASH)
        if ingest and may_hold and (admission or yielding):
            held.add(WorkClass.INGEST)  # an admission step, or a yield step
            if admission and may_chunk and not may_hold_running and WorkClass.INGEST in run_cls:
                cap = cfg.ingest_share_tokens  # the running ingestion cannot be held: it leaves room instead
        elif ingest and fg_active:  # share step
            fg_demand = sum(demand(r) for r, c in zip(running, run_cls) if c in FOREGROUND)
            budget = min(token_budget, max(1, fg_demand + cfg.ingest_share_tokens))
            held_fg_waiting = [r for r, c in zip(waiting, wait_cls) if c in FOREGROUND]
        elif ingest and may_chunk and self.step_sizer.applies(token_budget):
            budget, bounded = self.step_sizer.bound(token_budget), True  # no admittable foreground: bounded
        held_running = [r for r, c in zip(running, run_cls) if c in held] if may_hold_running else []
        held_waiting = [r for r, c in zip(waiting, wait_cls) if c in held]
        held_waiting += held_fg_waiting
        return StepPlan(
            held_running=held_running,
            held_waiting=held_waiting,
            token_budget=budget,
            held_classes=frozenset(klass(r) for r in held_running + held_waiting),
            ingest_yielded=WorkClass.INGEST in held and not admission,
            prefill_cap=cap,
            ingest_bounded=bounded,
        )

    def after_step(self, plan: StepPlan, scheduled: dict[str, int], klass_of: Callable[[str], WorkClass]) -> bool:
        """Record the step: ``scheduled`` maps request id -> tokens it got. True when it is a bounded step in
        which ingestion got tokens: its wall time is a measure for the time target (``bounded_step_took``)."""
        self.step += 1
        now = self.clock()
        by_class: Counter[WorkClass] = Counter()
        for request_id, tokens in scheduled.items():
            by_class[klass_of(request_id)] += tokens
        for c, tokens in by_class.items():
            self.counters[f"tokens_{c.label}"] += tokens
        ingest_tokens = by_class[WorkClass.INGEST]
        admitted_fg = False
        for request_id, arrival in list(self._arrivals.items()):
            if request_id in scheduled:
                del self._arrivals[request_id]
                self._admitted(request_id, arrival, now)
                admitted_fg = admitted_fg or arrival.klass in FOREGROUND
            else:
                arrival.ingest_tokens += ingest_tokens
        self._ingest_running = ingest_tokens > 0
        capped = plan.prefill_cap is not None
        if WorkClass.INGEST in plan.held_classes or capped:
            # a capped admission step counts toward the hold bound: if its request still could not be
            # admitted (no blocks for it), the next step is a share step, not another capped one
            self._ingest_held_streak += 1
            if WorkClass.INGEST in plan.held_classes:
                self.counters["ingest_held_steps"] += 1
            if plan.ingest_yielded:
                self.counters["ingest_yield_steps"] += 1
        else:
            self._ingest_held_streak = 0
            if plan.ingest_bounded:
                if ingest_tokens:
                    self.counters["ingest_bounded_steps"] += 1
                    self.counters["ingest_bounded_tokens"] += sum(scheduled.values())
            elif plan.token_budget is not None:
                self.counters["ingest_share_steps"] += 1
                self.counters["tokens_ingest_beside_foreground"] += ingest_tokens
        if capped and admitted_fg:
            self.counters["ingest_capped_admission_steps"] += 1
        if WorkClass.FLASH in plan.held_classes:
            self.counters["flash_held_steps"] += 1
        elif by_class[WorkClass.FLASH] and len(by_class) > 1:
            self.counters["flash_shared_steps"] += 1
        self._starved = bool(plan.held_classes) and not scheduled
        return plan.ingest_bounded and ingest_tokens > 0

    def bounded_step_took(self, tokens: int, seconds: float) -> None:
        """A bounded ingestion step (``StepPlan.ingest_bounded``) of ``tokens`` ran ``seconds`` from its
        scheduling to its output: the time target's measure (``ingest_step``)."""
        self.step_sizer.observe(tokens, seconds)

    def _admitted(self, request_id: str, arrival: _Arrival, now: float) -> None:
        label = arrival.klass.label
        waited = now - arrival.at_time
        self.counters[f"wait_s_{label}"] += waited
        self.counters[f"wait_n_{label}"] += 1
        if arrival.klass in FOREGROUND:
            self.waits.append(
                {
                    "request_id": request_id,
                    "class": label,
                    "steps": self.step - arrival.at_step - 1,
                    "seconds": round(waited, 6),
                    "ingest_running_at_arrival": arrival.ingest_running,
                    "ingest_tokens_while_waiting": arrival.ingest_tokens,
                }
            )
