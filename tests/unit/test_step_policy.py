"""Work classes per engine step (pure: ``StepPolicy`` driven by a small model of vLLM's step).

``Engine`` below does what vLLM's ``schedule()`` does with a token budget, reduced to what the
policy changes: running requests in order get their demand while budget lasts, then waiting
requests are admitted in order. The scheduler around it applies the plan exactly as
``StatefulScheduler.schedule`` does (hold, sort by class, cut the budget). The tables are the
contract: tokens each request gets per step.
"""

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from vllm_stateful.engine.work_classes import (
    CLASS_KEY,
    FLASH,
    INGEST,
    ShareConfig,
    StepPolicy,
    WorkClass,
    marked_class,
)

pytestmark = pytest.mark.unit

Q, P, ING, F = WorkClass.QUERY, WorkClass.PLAIN, WorkClass.INGEST, WorkClass.FLASH


@dataclass(eq=False)
class Req:
    rid: str
    klass: WorkClass
    prompt: int  # tokens to prefill
    decode: int = 0  # tokens to generate after the prefill
    done: int = 0

    @property
    def demand(self) -> int:
        return self.prompt - self.done if self.done < self.prompt else 1

    @property
    def finished(self) -> bool:
        return self.done >= self.prompt + self.decode


class Engine:
    def __init__(self, budget: int, share: int = 64, hold: int = 1, yield_steps: int = 0, step_cap: int = 0) -> None:
        self.budget = budget
        self.counters: Counter = Counter()
        self.policy = StepPolicy(ShareConfig(share, hold, yield_steps, step_cap), self.counters, clock=lambda: 0.0)
        self.may_hold_running = True  # False: KV blocks low
        self.may_chunk = True  # False: vLLM's chunked prefill off
        self.no_blocks: set[str] = set()  # waiting requests vLLM cannot allocate blocks for
        self.running: list[Req] = []
        self.waiting: list[Req] = []
        self.by_id: dict[str, Req] = {}

    def add(self, *reqs: Req) -> None:
        for r in reqs:
            self.waiting.append(r)
            self.by_id[r.rid] = r
            self.policy.arrived(r.rid, r.klass)

    def step(self) -> dict[str, int]:
        plan = self.policy.plan(
            self.running,
            self.waiting,
            lambda r: r.klass,
            lambda r: r.demand,
            self.budget,
            may_hold_running=self.may_hold_running,
            may_chunk=self.may_chunk,
        )
        held = {id(r) for r in plan.held_running + plan.held_waiting}
        running = sorted((r for r in self.running if id(r) not in held), key=lambda r: r.klass)
        waiting = sorted((r for r in self.waiting if id(r) not in held), key=lambda r: r.klass)
        budget = self.budget if plan.token_budget is None else plan.token_budget
        cap = budget if plan.prefill_cap is None else plan.prefill_cap  # vLLM's long_prefill_token_threshold
        got: dict[str, int] = {}
        for r in running + waiting:  # vLLM: running first, then admissions
            if r.rid in self.no_blocks:
                continue
            n = min(r.demand, budget, cap)
            if n <= 0:
                break
            got[r.rid] = n
            budget -= n
            if r in self.waiting:
                self.waiting.remove(r)
                self.running.append(r)
        self.policy.after_step(plan, got, lambda rid: self.by_id[rid].klass)
        for rid, n in got.items():
            self.by_id[rid].done += n
        self.running = [r for r in self.running if not r.finished]
        return got


def test_classes_come_from_the_plugins_marks_and_the_verified_tag():
    assert marked_class({CLASS_KEY: FLASH}, True) == F and marked_class({CLASS_KEY: FLASH}, False) == F
    assert marked_class({CLASS_KEY: INGEST}, True) == ING
    assert marked_class(None, True) == Q and marked_class({"x": 1}, True) == Q
    # a client cannot raise its own rank: without a verified session tag it is plain traffic
    assert marked_class({CLASS_KEY: "query"}, False) == P and marked_class(None, False) == P
    assert marked_class({CLASS_KEY: "other"}, False) == P


def test_a_query_arriving_during_a_long_ingestion_waits_one_chunk_then_shares_the_steps():
    e = Engine(budget=512, share=64)
    ingest = Req("i", ING, prompt=2000)
    e.add(ingest)
    assert e.step() == {"i": 512}  # no foreground: the whole budget (prefill speed)
    e.add(Req("q", Q, prompt=20, decode=3))  # arrives while the chunk above runs
    table = [
        {"q": 20},  # ingestion held: the query is admitted in the very next step
        {"q": 1, "i": 64},  # query decoding: ingestion gets its share, the step stays small
        {"q": 1, "i": 64},
        {"q": 1, "i": 64},
        {"i": 512},  # query done: the whole budget again
        {"i": 512},
        {"i": 272},
    ]
    assert [e.step() for _ in table] == table
    assert ingest.finished
    (wait,) = e.policy.waits
    assert wait["steps"] == 0 and wait["ingest_running_at_arrival"] and wait["ingest_tokens_while_waiting"] == 0
    assert e.counters["ingest_held_steps"] == 1 and e.counters["ingest_share_steps"] == 3
    assert e.counters["tokens_ingest_beside_foreground"] == 3 * 64
    assert e.counters["tokens_ingest"] == 2000 and e.counters["tokens_query"] == 23


def test_under_continuous_queries_ingestion_still_gets_its_share_every_other_step():
    e = Engine(budget=512, share=64, hold=1)
    e.add(Req("i", ING, prompt=5000))
    e.step()
    steps = []
    for n in range(12):  # a new query arrives before every step
        e.add(Req(f"q{n}", Q, prompt=8, decode=1))
        steps.append(e.step())
    ingest = [s.get("i", 0) for s in steps]
    assert ingest == [0, 64] * 6  # held for one admission, then its share: the starvation bound
    # every query is admitted within one step of arriving, the guard step included
    assert max(w["steps"] for w in e.policy.waits) <= 1
    assert all(w["ingest_tokens_while_waiting"] <= 64 for w in e.policy.waits)


def test_waiting_ingestion_is_admitted_under_continuous_plain_traffic():
    e = Engine(budget=512, share=64)
    e.add(Req("long", P, prompt=4, decode=1000))  # a long generation: foreground running throughout
    e.step()
    e.add(Req("i", ING, prompt=5000))  # never ran yet: it must still be admitted and advance
    got = []
    for n in range(10):
        e.add(Req(f"p{n}", P, prompt=100))  # a new plain prompt before every step
        got.append(e.step())
    assert [s.get("i", 0) for s in got] == [0, 64] * 5
    # a share step holds the foreground admissions for that step only: each waits <= 1 step
    assert all(w["steps"] <= 1 for w in e.policy.waits)
    assert sum(1 for w in e.policy.waits if w["request_id"].startswith("p")) >= 5


def test_foreground_that_cannot_be_admitted_holds_nothing_back():
    policy = StepPolicy(ShareConfig(), Counter(), clock=lambda: 0.0)
    ingest, query = Req("i", ING, 1000), Req("q", Q, 10)

    def plan(**kw):
        return policy.plan([ingest], [query], lambda r: r.klass, lambda r: r.demand, 512, **kw)

    assert plan().held_running == [ingest]  # an admission step
    # blocked (e.g. waiting for a grammar or remote KV) or no running slot free: nothing to make room for
    assert plan(admittable=lambda r: False).held_running == [] and plan(admittable=lambda r: False).token_budget is None
    assert plan(free_slots=False).held_running == []
    # KV blocks low: running requests are not held (vLLM must be able to preempt them); waiting ones still are
    assert plan(may_hold_running=False).held_running == []
    queued = Req("i2", ING, 100)
    low = policy.plan([], [query, queued], lambda r: r.klass, lambda r: r.demand, 512, may_hold_running=False)
    assert low.held_waiting == [queued]


def test_a_longer_hold_bound_trades_ingestion_share_for_admission_latency():
    e = Engine(budget=512, share=32, hold=3)
    e.add(Req("i", ING, prompt=5000))
    e.step()
    ingest = []
    for n in range(8):
        e.add(Req(f"q{n}", Q, prompt=8, decode=1))
        ingest.append(e.step().get("i", 0))
    assert ingest == [0, 0, 0, 32] * 2


def test_ingestion_yields_to_a_short_answer_and_keeps_its_share_under_a_long_one():
    e = Engine(budget=512, share=64, yield_steps=4)
    ingest = Req("i", ING, prompt=3000)
    e.add(ingest)
    assert e.step() == {"i": 512}
    e.add(Req("q", Q, prompt=20, decode=3))
    table = [
        {"q": 20},  # admission step
        {"q": 1},  # yield steps: the answer decodes without ingestion beside it
        {"q": 1},
        {"q": 1},
        {"i": 512},  # answer done: the whole budget again
    ]
    assert [e.step() for _ in table] == table
    assert e.counters["ingest_share_steps"] == 0 and e.counters["ingest_held_steps"] == 4
    assert e.counters["ingest_yield_steps"] == 3  # the admission step is not a yield step
    # a long generation: ingestion yields for the first yield_steps of it (admission included), then
    # shares every step, as with no yield steps: sustained foreground keeps ingestion's share per step
    e.add(Req("long", Q, prompt=10, decode=40))
    got = [e.step().get("i", 0) for _ in range(20)]
    assert got == [0] * 4 + [64] * 16
    assert not ingest.finished


def test_back_to_back_short_queries_run_as_without_yield_steps_after_the_first_burst():
    def closed_loop(yield_steps: int) -> tuple[int, int]:
        e = Engine(budget=512, share=64, yield_steps=yield_steps)
        ingest = Req("i", ING, prompt=100_000)
        e.add(ingest)
        e.step()
        done = 0
        for n in range(200):
            if not e.waiting and not any(r.klass == Q for r in e.running):
                e.add(Req(f"q{n}", Q, prompt=8, decode=3))  # the next query as soon as the last one ends
                done += 1
            e.step()
        return done, ingest.done

    queries_8, ingested_8 = closed_loop(8)
    queries_0, ingested_0 = closed_loop(0)
    # a single burst: ingestion yields its first 8 steps only, and no query waits an extra step
    assert queries_8 >= queries_0 - 1 and ingested_8 >= ingested_0 - 8 * 64, (queries_8, queries_0)


def test_no_yield_step_when_running_ingestion_cannot_be_held():
    e = Engine(budget=512, share=64, yield_steps=8)
    e.add(Req("i", ING, prompt=3000))
    assert e.step() == {"i": 512}
    e.add(Req("q", Q, prompt=20, decode=3))
    assert e.step() == {"q": 20}  # admitted
    e.may_hold_running = False  # KV blocks low: vLLM must be able to preempt the running ingestion
    # share steps cap the ingestion beside the decode (a yield step could not hold it: it would take it all)
    assert [e.step() for _ in range(3)] == [{"q": 1, "i": 64}] * 3
    assert e.counters["ingest_yield_steps"] == 0


def test_under_kv_pressure_a_query_is_admitted_beside_a_running_ingestion():
    """KV blocks low: the running ingestion cannot be held, so the admission step caps it at its
    share and the query is admitted in that same step (before the cap it waited for the whole
    ingestion: the admission step gave the ingestion the whole budget, the share step held the query)."""
    e = Engine(budget=512, share=64, yield_steps=8)
    e.add(Req("i", ING, prompt=3000))
    assert e.step() == {"i": 512}
    e.may_hold_running = False
    e.add(Req("q", Q, prompt=20, decode=2))
    assert e.step() == {"i": 64, "q": 20}  # the admission step: ingestion capped, the query admitted
    assert e.counters["ingest_capped_admission_steps"] == 1
    assert [e.step() for _ in range(2)] == [{"q": 1, "i": 64}] * 2  # decode beside capped share steps
    assert e.step() == {"i": 512}  # the query is done: ingestion has the whole budget again
    # a long foreground prompt is admitted the same way; its first chunk is capped for that one step
    e.add(Req("p", P, prompt=1000))
    assert e.step() == {"i": 64, "p": 64}
    assert e.step() == {"p": 512}  # share step: foreground demand fills the budget (documented caveat)


def test_a_capped_admission_step_that_admits_nothing_alternates_with_share_steps():
    """The query cannot get blocks: the cap must not stay on (it would cut a running prefill to the
    share in every step), and nothing is counted as a capped admission."""
    e = Engine(budget=512, share=64)
    e.add(Req("i", ING, prompt=5000), Req("p", P, prompt=5000))
    assert e.step() == {"p": 512}  # p admitted (plain, foreground); i waits
    e.may_hold_running = False
    assert e.step() == {"p": 512}  # share step: the foreground's demand fills the budget
    e.running.append(e.waiting.pop())  # i running too (vLLM admitted it in a step the model skips)
    e.add(Req("q", Q, prompt=20))
    e.no_blocks.add("q")
    capped, share = {"p": 64, "i": 64}, {"p": 512}
    assert [e.step() for _ in range(4)] == [capped, share, capped, share]
    assert e.counters["ingest_capped_admission_steps"] == 0
    e.no_blocks.clear()
    assert e.step() == {"p": 64, "i": 64, "q": 20} and e.counters["ingest_capped_admission_steps"] == 1


def test_without_chunked_prefill_no_step_is_bounded_or_capped():
    e = Engine(budget=512, share=64, step_cap=100)
    e.may_chunk = False
    e.add(Req("i", ING, prompt=3000))
    assert e.step() == {"i": 512}
    e.may_hold_running = False
    e.add(Req("q", Q, prompt=20))
    assert e.step() == {"i": 512}  # no cap: vLLM could not admit a prompt over a capped budget
    assert e.counters["ingest_bounded_steps"] == 0 and e.counters["ingest_capped_admission_steps"] == 0


def test_ingest_step_tokens_bounds_a_step_of_ingestion_alone_and_nothing_else():
    e = Engine(budget=512, share=64, yield_steps=2, step_cap=200)
    e.add(Req("i", ING, prompt=1000), Req("j", ING, prompt=100))
    assert [e.step() for _ in range(2)] == [{"i": 200}, {"i": 200}]  # alone: steps of at most 200 tokens
    e.add(Req("q", Q, prompt=300, decode=4))
    # the query waits for the running step only (here: none), is admitted with vLLM's whole budget,
    # its first burst steps yield, then share steps as before
    shared = {"q": 1, "i": 64}
    assert [e.step() for _ in range(5)] == [{"q": 300}, {"q": 1}, shared, shared, shared]
    assert e.step() == {"i": 200}  # alone again
    assert e.counters["ingest_bounded_steps"] == 3 and e.counters["ingest_share_steps"] == 3
    big = Engine(budget=512, step_cap=1024)  # a bound above vLLM's budget changes nothing
    big.add(Req("i", ING, prompt=1000))
    assert big.step() == {"i": 512} and big.counters["ingest_bounded_steps"] == 0


def test_yield_steps_never_hold_ingestion_longer_than_their_bound_whatever_the_arrivals():
    rng = random.Random(3)
    for yield_steps, hold in ((4, 1), (2, 3), (8, 2)):
        e = Engine(budget=512, share=16, hold=hold, yield_steps=yield_steps)
        e.add(Req("i", ING, prompt=100_000))
        run, longest = 0, 0
        for n in range(400):
            if rng.random() < 0.4:  # short answers and plain prompts arriving at random
                e.add(Req(f"q{n}", rng.choice((Q, P)), prompt=rng.randrange(1, 40), decode=rng.randrange(0, 6)))
            run = 0 if e.step().get("i") else run + 1
            longest = max(longest, run)
        assert longest <= max(yield_steps, hold), (yield_steps, hold, longest)


def test_queries_before_plain_traffic_before_ingestion_before_flash():
    e = Engine(budget=30)
    e.add(Req("f", F, 10), Req("i", ING, 10), Req("p", P, 10, decode=1), Req("q", Q, 10, decode=1))
    # waiting in arrival order f, i, p, q; ingestion and flash held while foreground waits
    assert e.step() == {"q": 10, "p": 10}
    assert e.step() == {"q": 1, "p": 1, "i": 10}  # foreground decoding: ingestion's share (<= 64)
    assert e.step() == {"f": 10}  # flash only on spare capacity: nothing else left


def test_flash_is_held_while_anything_else_exists_but_never_deadlocks():
    e = Engine(budget=100)
    e.add(Req("f", F, prompt=10, decode=5))
    assert e.step() == {"f": 10}  # alone: runs
    e.add(Req("q", Q, prompt=10, decode=1))
    assert e.step() == {"q": 10}  # held for foreground work
    assert e.counters["flash_held_steps"] == 1
    assert e.step() == {"q": 1}
    assert e.step() == {"f": 1}
    # a step that held flash work and scheduled nothing: the next step holds nothing
    policy = StepPolicy(ShareConfig(), Counter(), clock=lambda: 0.0)
    f, q = Req("f", F, 5), Req("q", Q, 5)
    plan = policy.plan([f], [q], lambda r: r.klass, lambda r: r.demand, 100)
    assert plan.held_running == [f]
    policy.after_step(plan, {}, lambda rid: F)  # e.g. q could not get KV blocks
    assert policy.plan([f], [q], lambda r: r.klass, lambda r: r.demand, 100).held_running == []


def test_share_config_is_validated():
    with pytest.raises(ValueError):
        ShareConfig(ingest_share_tokens=0)
    with pytest.raises(ValueError):
        ShareConfig(max_ingest_hold_steps=0)  # a share step holds admissions: at least one admission step
    with pytest.raises(ValueError):
        ShareConfig(ingest_yield_steps=-1)
    with pytest.raises(ValueError):
        ShareConfig(ingest_step_tokens=-1)


def test_a_step_time_target_sizes_ingestion_steps_from_their_measured_time():
    e = Engine(budget=512, share=32, step_cap=400)
    e.policy = StepPolicy(ShareConfig(32, 1, 0, 400, ingest_step_target_s=1.0), e.counters, clock=lambda: 0.0)
    e.add(Req("i", ING, prompt=5000))
    sizes = []
    for _ in range(8):
        got = e.step()
        sizes.append(got["i"])
        e.policy.bounded_step_took(got["i"], 0.2 + got["i"] * 0.01)  # 1 s at 80 tokens
    assert sizes[0] == 32 and 75 <= sizes[-1] <= 82
    assert e.counters["ingest_bounded_steps"] == 8 and e.counters["ingest_bounded_tokens"] == sum(sizes)
    e.add(Req("q", Q, prompt=20))
    assert e.step() == {"q": 20}  # a query is admitted as before: the target only sizes ingestion alone
    full = Engine(budget=512, share=32)  # no token bound: with a target a full-budget step is still bounded
    full.policy = StepPolicy(ShareConfig(32, 1, 0, 0, ingest_step_target_s=60.0), full.counters, clock=lambda: 0.0)
    full.add(Req("i", ING, prompt=5000))
    for _ in range(6):
        got = full.step()
        full.policy.bounded_step_took(got["i"], 0.01 * got["i"])
    assert got == {"i": 512} and full.counters["ingest_bounded_steps"] == 6


def test_a_bounded_step_in_which_ingestion_gets_nothing_counts_as_no_kind_of_step():
    from vllm_stateful.engine.work_classes import StepPlan

    counters: Counter = Counter()
    policy = StepPolicy(ShareConfig(64, 1, 0, 256), counters, clock=lambda: 0.0)
    bounded = StepPlan(token_budget=256, ingest_bounded=True)
    # neither is a measure for the time target either
    assert not policy.after_step(bounded, {}, lambda rid: ING)  # ingestion waits on something else
    assert not policy.after_step(bounded, {"f": 1}, lambda rid: F)  # running flash only
    assert counters["ingest_bounded_steps"] == counters["ingest_share_steps"] == 0
    assert policy.after_step(bounded, {"i": 200, "f": 1}, lambda rid: ING if rid == "i" else F)
    assert counters["ingest_bounded_steps"] == 1 and counters["ingest_bounded_tokens"] == 201
    assert not policy.after_step(StepPlan(token_budget=100), {"i": 36, "q": 64}, lambda rid: ING)  # share step
