"""Pure helpers for the multi-tenant benchmark (``multi_tenant.py``): the seeded Poisson workload,
Prometheus text parsing, per-phase statistics, the rows of its CSVs, the PNG and the Markdown summary.

Nothing here talks to a server or imports vLLM; tested in ``tests/unit/test_multi_tenant_report.py``.

Definitions:
- ``recomputed_tokens`` of a query: tokens the server had already been sent (or held) for that
  session and prefilled again. vllm-stateful reports it (``session.recomputed_tokens``); for stock
  vLLM it is ``prompt_tokens - cached_tokens - fresh``, where ``fresh`` counts the tokens of this
  prompt the server has never been sent (appends since the session's last request, the query itself).
  ``prefilled_tokens`` is everything the query prefilled (``new_tokens``; stock: ``prompt - cached``).
- scheduler overhead: ``delta(scheduler_seconds) / delta(step_seconds)`` over a phase, from the
  server's ``/metrics``; a metric the server does not export leaves the cell empty.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from harness.machine import machine_line
from harness.results import pyplot, save_figure, summary_header
from streaming_report import percentile

OURS, STOCK = "vllm-stateful", "vllm-prefix-cache"
PREFIX = "vllm_stateful:"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# ---------------------------------------------------------------- workload


@dataclass(frozen=True)
class Event:
    t_s: float  # seconds after the phase start
    kind: str  # "append" | "query"
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    system: tuple[int, ...]  # the shared system prompt every session starts with
    sessions: tuple[tuple[Event, ...], ...]  # per session, in time order


def poisson_times(rate: float, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process of ``rate``/s in ``[0, duration_s)``."""
    out, t = [], 0.0
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        out.append(t)
    return out


def random_tokens(rng: random.Random, n: int, lo: int, hi: int) -> tuple[int, ...]:
    return tuple(rng.randrange(lo, hi) for _ in range(n))


def make_plan(
    n_sessions: int,
    duration_s: float,
    append_rate: float,
    query_rate: float,
    append_tokens: int,
    query_tokens: int,
    system: Sequence[int],
    vocab: tuple[int, int],
    seed: int,
) -> Plan:
    """Per session, independent Poisson appends and queries (rates per session per second), each
    with fresh random token ids in ``[vocab[0], vocab[1])``. Deterministic in its arguments."""
    rng = random.Random(f"{seed}/{n_sessions}")
    sessions = []
    for _ in range(n_sessions):
        events = [(t, "append", append_tokens) for t in poisson_times(append_rate, duration_s, rng)]
        events += [(t, "query", query_tokens) for t in poisson_times(query_rate, duration_s, rng)]
        sessions.append(tuple(Event(t, k, random_tokens(rng, n, *vocab)) for t, k, n in sorted(events)))
    return Plan(tuple(system), tuple(sessions))


def full_hit_tokens(prompt_tokens: int, block_size: int) -> int:
    """The most prompt tokens a prefix cache can serve for a prompt it holds entirely: whole blocks,
    leaving at least the last token to compute."""
    return (prompt_tokens - 1) // block_size * block_size


def stock_recomputed(prompt_tokens: int, cached_tokens: int | None, fresh_tokens: int) -> int | None:
    """Tokens stock vLLM prefilled although it had been sent them before (None: no cache counts)."""
    if cached_tokens is None:
        return None
    return max(0, prompt_tokens - cached_tokens - fresh_tokens)


# ---------------------------------------------------------------- Prometheus

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> Samples:
    """Samples of a Prometheus text exposition: ``{(name, sorted label pairs): value}``. Comments,
    blank and unparsable lines are skipped."""
    out: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = value
    return out


def metric(samples: Samples | None, *names: str, **labels: str) -> float | None:
    """The first of ``names`` (each also tried with ``_total``, as prometheus_client names counters)
    present in ``samples``: the sum of its series carrying ``labels``; None if none is there.
    Names without a ``:`` get the ``vllm_stateful:`` prefix."""
    if not samples:
        return None
    want = set(labels.items())
    for name in names:
        full = name if ":" in name else PREFIX + name
        for candidate in (full, full + "_total"):
            hits = [v for (n, ls), v in samples.items() if n == candidate and want <= set(ls)]
            if hits:
                return sum(hits)
    return None


def delta(before: Samples | None, after: Samples | None, *names: str, **labels: str) -> float | None:
    a, b = metric(before, *names, **labels), metric(after, *names, **labels)
    return None if a is None or b is None else b - a


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def scheduler_overhead(before: Samples | None, after: Samples | None) -> float | None:
    """Share of engine step time spent in ``schedule()`` between two scrapes."""
    return ratio(delta(before, after, "scheduler_seconds"), delta(before, after, "step_seconds"))


def class_wait_mean(before: Samples | None, after: Samples | None, cls: str) -> float | None:
    """Mean seconds a request of work class ``cls`` waited to be scheduled between two scrapes."""
    total = delta(before, after, "class_wait_seconds_sum", "class_wait_seconds", **{"class": cls})
    count = delta(before, after, "class_wait_count", "class_wait_seconds_count", **{"class": cls})
    return ratio(total, count)


# ---------------------------------------------------------------- rows and summaries


@dataclass
class QueryRow:
    """One answered query, one line of ``queries.csv``."""

    server: str
    n_sessions: int
    session: int
    t_s: float  # sent, seconds after the phase start
    context_tokens: int
    latency_s: float
    prefilled_tokens: int | None
    recomputed_tokens: int | None


@dataclass
class PhaseMetrics:
    """What one server reported around one phase (None: not exported / not measured)."""

    scheduler_overhead: float | None = None
    fragmentation: float | None = None
    pinned_blocks: float | None = None
    budget_blocks: float | None = None
    grouped_prefill_saved: float | None = None
    class_wait_s: dict[str, float | None] = field(default_factory=dict)
    retries: int = 0  # requests answered 429/503 and sent again
    failed_queries: int = 0


def phase_metrics(
    before: Samples | None, after: Samples | None, retries: int = 0, failed_queries: int = 0
) -> PhaseMetrics:
    return PhaseMetrics(
        scheduler_overhead(before, after),
        metric(after, "fragmentation"),
        metric(after, "pinned_blocks"),
        metric(after, "budget_blocks"),
        delta(before, after, "grouped_prefill_tokens_saved"),
        {c: class_wait_mean(before, after, c) for c in ("query", "plain", "ingest", "flash")},
        retries,
        failed_queries,
    )


@dataclass
class Summary:
    """One line of ``summary.csv``: one server at one session count."""

    server: str
    n_sessions: int
    queries: int
    ctx_max: int | None
    p50_s: float | None
    p95_s: float | None
    prefilled_tokens: int
    reprefilled_tokens: int | None
    scheduler_overhead: float | None
    fragmentation: float | None
    query_wait_s: float | None
    retries: int
    failed_queries: int
    sessions_fit: int | None


def summarize(
    rows: Sequence[QueryRow], phases: dict[tuple[str, int], PhaseMetrics], fit: dict[str, int | None]
) -> list[Summary]:
    """One ``Summary`` per (server, N) in ``phases`` order, plus any (server, N) only seen in rows."""
    keys = list(dict.fromkeys([*phases, *((r.server, r.n_sessions) for r in rows)]))
    out = []
    for server, n in keys:
        rs = [r for r in rows if (r.server, r.n_sessions) == (server, n)]
        lat = [r.latency_s for r in rs]
        rec = [r.recomputed_tokens for r in rs if r.recomputed_tokens is not None]
        pm = phases.get((server, n), PhaseMetrics())
        out.append(
            Summary(
                server,
                n,
                len(rs),
                max((r.context_tokens for r in rs), default=None),
                percentile(lat, 50) if lat else None,
                percentile(lat, 95) if lat else None,
                sum(r.prefilled_tokens or 0 for r in rs),
                sum(rec) if rec else None,
                pm.scheduler_overhead,
                pm.fragmentation,
                pm.class_wait_s.get("query"),
                pm.retries,
                pm.failed_queries,
                fit.get(server),
            )
        )
    return out


def _cell(x: object, fmt: str = ".3f") -> str:
    if x is None:
        return ""
    return format(x, fmt) if isinstance(x, float) else str(x)


def markdown_table(summaries: Sequence[Summary]) -> str:
    head = (
        "| server | N | queries | max ctx | p50 (s) | p95 (s) | prefilled | re-prefilled | sched. overhead "
        "| fragmentation | query wait (s) | 429/503 retries | failed queries | sessions fit |"
    )
    lines = [head, "|---|" + "---:|" * 13]
    for s in summaries:
        cells = (s.server, s.n_sessions, s.queries, s.ctx_max, _cell(s.p50_s), _cell(s.p95_s), s.prefilled_tokens)
        cells += (s.reprefilled_tokens, _cell(s.scheduler_overhead), _cell(s.fragmentation), _cell(s.query_wait_s))
        cells += (s.retries, s.failed_queries, s.sessions_fit)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(summaries: Sequence[Summary], probes: dict[str, dict], meta: dict) -> str:
    """summary.md: the command, model, dtype and machine (CPU model, ISA flags), the table, the probe."""
    details = f"model `{meta['model']}` in {meta['dtype']}"
    return summary_header(
        "Multi-tenant benchmark", details, machine_line(meta["machine"]), meta.get("command")
    ) + "\n".join(
        [
            f"server flags (both): `{' '.join(meta['server_args'])}`\n",
            markdown_table(summaries),
            "re-prefilled: tokens prefilled again although the server had been sent them before; scheduler "
            "overhead: time in schedule() / engine step time; query wait: mean wait of a query to be scheduled.\n",
            "Capacity probe (sessions fit: admitted before the first 429 / held before the first LRU eviction; "
            "empty: not reached within the cap):\n",
            *(f"- {server}: `{json.dumps(p)}`" for server, p in probes.items()),
            "\n![multi_tenant.png](multi_tenant.png)\n",
        ]
    )


def plot(rows: Sequence[QueryRow], summaries: Sequence[Summary], path: str | Path) -> Path:
    """PNG: p50/p95 latency vs N, latency vs context, re-prefilled tokens vs N; one colour per server."""
    servers = list(dict.fromkeys([*(s.server for s in summaries), *(r.server for r in rows)]))
    fig, (a1, a2, a3) = pyplot().subplots(1, 3, figsize=(17, 4.8))
    for i, server in enumerate(servers):
        ss = sorted((s for s in summaries if s.server == server and s.p50_s is not None), key=lambda s: s.n_sessions)
        fit = next((s.sessions_fit for s in ss if s.sessions_fit is not None), None)
        label = server if fit is None else f"{server} (fits {fit} sessions)"
        n = [s.n_sessions for s in ss]
        a1.plot(n, [s.p50_s for s in ss], f"C{i}-o", label=f"{label} p50")
        a1.plot(n, [s.p95_s for s in ss], f"C{i}--^", label=f"{label} p95")
        a3.plot(n, [s.reprefilled_tokens or 0 for s in ss], f"C{i}-o", label=server)
        rs = [r for r in rows if r.server == server]
        a2.scatter([r.context_tokens for r in rs], [r.latency_s for r in rs], s=8, c=f"C{i}", alpha=0.5, label=server)
    for ax, title, xl, yl in (
        (a1, "query latency vs sessions", "sessions (N)", "latency (s)"),
        (a2, "query latency vs context", "context tokens", "latency (s, log)"),
        (a3, "re-prefilled tokens vs sessions", "sessions (N)", "tokens (sum over queries)"),
    ):
        ax.set(title=title, xlabel=xl, ylabel=yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a2.set_yscale("log")
    ns = sorted({s.n_sessions for s in summaries})
    for ax in (a1, a3):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
    return save_figure(fig, path)
