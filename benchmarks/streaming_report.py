"""Pure helpers for the streaming benchmark: the synthetic feed, statistics, CSV, chart, summary.

Nothing here talks to a server or imports vLLM, so all of it is unit-tested in
``tests/unit/test_streaming_report.py``. The driver is ``streaming_benchmark.py``.

Contracts:
- ``make_feed`` is a pure function of its arguments: the same seed gives byte-identical ticks and
  questions, so every provider sees the same data and is asked the same questions after the same tick.
- Latency statistics are computed per provider from ``QueryRow`` values only; a CSV written by
  ``write_csv`` reads back (``read_csv``) to equal rows, so reports can be rebuilt from the CSV.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from harness.results import columns_of, pyplot, read_rows, save_figure, write_rows

DEFAULT_SYMBOLS: dict[str, float] = {"BTC": 64123.55, "ETH": 3150.20, "SOL": 145.22, "NVDA": 121.45, "GOLD": 2331.40}
QUESTION_TEMPLATES = (
    "What is the current trend of {sym}?",
    "What was the largest move in the last minute?",
    "What is the latest price of {sym}?",
    "Which symbol is up the most since {time}?",
    "Is {sym} trading above its first price of the session?",
)
DEFAULT_BUCKET_EDGES = (0, 1000, 2000, 3000, 4000, 5000, 6000, 8000)


@dataclass(frozen=True)
class Tick:
    """One market-data line; ``line`` ends with a newline and is what gets appended."""

    idx: int
    clock: str
    symbol: str
    price: float
    change_pct: float
    line: str


@dataclass(frozen=True)
class Question:
    """A question asked right after tick ``after_tick`` has been appended; ``prompt`` is sent as is."""

    idx: int
    after_tick: int
    text: str
    prompt: str


@dataclass(frozen=True)
class Feed:
    ticks: tuple[Tick, ...]
    questions: tuple[Question, ...]

    def text_through(self, tick_idx: int) -> str:
        """All tick lines from the first through ``tick_idx`` (inclusive), concatenated."""
        return "".join(t.line for t in self.ticks[: tick_idx + 1])


def _clock(start_s: int, offset_s: float) -> str:
    s = int(start_s + offset_s)
    return f"{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def question_points(n_ticks: int, n_questions: int, rng: random.Random, jitter: float = 0.3) -> list[int]:
    """Strictly increasing tick indices, about evenly spaced, each moved by up to ``jitter`` of a
    spacing; the last question always follows the last tick (so the largest context is measured)."""
    if not 1 <= n_questions <= n_ticks:
        raise ValueError(f"need 1 <= questions ({n_questions}) <= ticks ({n_ticks})")
    spacing = n_ticks / n_questions
    points: list[int] = []
    for j in range(n_questions - 1):
        p = round((j + 1) * spacing - 1 + rng.uniform(-jitter, jitter) * spacing)
        lo = points[-1] + 1 if points else 0
        hi = n_ticks - 1 - (n_questions - 1 - j)  # leave room for the remaining questions
        points.append(min(max(p, lo), hi))
    points.append(n_ticks - 1)
    return points


def make_feed(
    n_ticks: int,
    n_questions: int,
    seed: int = 0,
    symbols: dict[str, float] | None = None,
    tick_interval_s: float = 1.0,
    start_clock_s: int = 9 * 3600 + 30 * 60,
    jitter: float = 0.3,
) -> Feed:
    """A seeded random-walk feed (``HH:MM:SS SYM PRICE +X.XX%``, change vs that symbol's previous
    price) on a virtual clock, and questions placed by ``question_points``."""
    rng = random.Random(seed)
    prices = dict(symbols or DEFAULT_SYMBOLS)
    names = sorted(prices)
    ticks = []
    for i in range(n_ticks):
        sym = rng.choice(names)
        change = rng.gauss(0.0, 0.15)
        prices[sym] = round(prices[sym] * (1 + change / 100), 2)
        clock = _clock(start_clock_s, (i + 1) * tick_interval_s)
        ticks.append(Tick(i, clock, sym, prices[sym], change, f"{clock} {sym} {prices[sym]:.2f} {change:+.2f}%\n"))
    questions = []
    for qi, after in enumerate(question_points(n_ticks, n_questions, rng, jitter)):
        text = rng.choice(QUESTION_TEMPLATES).format(sym=rng.choice(names), time=ticks[rng.randrange(after + 1)].clock)
        questions.append(Question(qi, after, text, f"\nQ: {text}\nA:"))
    return Feed(tuple(ticks), tuple(questions))


@dataclass
class QueryRow:
    """One answered question, one CSV row; ``ingest_lag_s`` is None for stateless providers."""

    provider: str
    question_idx: int
    context_tokens: int
    prompt_tokens_sent: int
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    ingest_lag_s: float | None = None


CSV_FIELDS = columns_of(QueryRow)


def write_csv(rows: Iterable[QueryRow], path: str | Path) -> Path:
    """Write rows with header ``CSV_FIELDS``; None is written as an empty cell."""
    return write_rows(rows, path, CSV_FIELDS)


def read_csv(path: str | Path) -> list[QueryRow]:
    """Inverse of ``write_csv``."""
    return read_rows(path, QueryRow)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _k(n: int) -> str:
    return f"{n / 1000:g}"


def bucket_label(tokens: int, edges: Sequence[int] = DEFAULT_BUCKET_EDGES) -> str:
    """``"1-2k"`` for edges[i] <= tokens < edges[i+1]; ``"8k+"`` at or past the last edge."""
    if tokens < edges[0]:
        raise ValueError(f"{tokens} tokens is below the first bucket edge {edges[0]}")
    for lo, hi in zip(edges, edges[1:]):
        if lo <= tokens < hi:
            return f"{_k(lo)}-{_k(hi)}k"
    return f"{_k(edges[-1])}k+"


@dataclass(frozen=True)
class BucketStat:
    provider: str
    bucket: str
    n: int
    p50_s: float
    p95_s: float


def bucket_table(rows: Sequence[QueryRow], edges: Sequence[int] = DEFAULT_BUCKET_EDGES) -> list[BucketStat]:
    """Latency p50/p95 per (provider, context bucket); providers in first-seen order, buckets ascending."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        bucket_label(r.context_tokens, edges)  # raises below the first edge
        groups.setdefault((r.provider, sum(r.context_tokens >= e for e in edges)), []).append(r.latency_s)
    providers = list(dict.fromkeys(r.provider for r in rows))
    return [
        BucketStat(p, bucket_label(edges[o - 1], edges), len(v), percentile(v, 50), percentile(v, 95))
        for (p, o), v in sorted(groups.items(), key=lambda kv: (providers.index(kv[0][0]), kv[0][1]))
    ]


def latency_at(rows: Sequence[QueryRow], tokens: int, k: int = 3) -> tuple[float, float]:
    """(median latency, median context) of the ``k`` rows whose context is nearest ``tokens``."""
    near = sorted(rows, key=lambda r: (abs(r.context_tokens - tokens), r.context_tokens))[:k]
    if not near:
        raise ValueError("no rows")
    return statistics.median(r.latency_s for r in near), statistics.median(r.context_tokens for r in near)


@dataclass(frozen=True)
class ProviderSummary:
    """Per provider: latency near ``ref_tokens`` and at its largest context, and their ratio."""

    provider: str
    n: int
    ref_context: float
    ref_latency_s: float
    max_context: float
    max_latency_s: float
    growth: float  # max_latency_s / ref_latency_s
    ingest_lag_p50_s: float | None = None
    ingest_lag_p95_s: float | None = None


def summarize(
    rows: Sequence[QueryRow],
    ingest_lags: dict[str, Sequence[float]] | None = None,
    ref_tokens: int = 1000,
    k: int = 3,
) -> tuple[list[ProviderSummary], int]:
    """Per-provider summaries, plus the largest context all providers reached (where speed-ups are
    compared). ``ingest_lags`` maps provider -> per-append lags (seconds), for stateful providers."""
    by = group_rows(rows)
    largest = min(max(r.context_tokens for r in rs) for rs in by.values())
    out = []
    for p, rs in by.items():
        ref_lat, ref_ctx = latency_at(rs, ref_tokens, k)
        max_lat, max_ctx = latency_at(rs, largest, k)
        lags = list((ingest_lags or {}).get(p) or [])
        out.append(
            ProviderSummary(
                p,
                len(rs),
                ref_ctx,
                ref_lat,
                max_ctx,
                max_lat,
                max_lat / ref_lat,
                percentile(lags, 50) if lags else None,
                percentile(lags, 95) if lags else None,
            )
        )
    return out, largest


def speedups(summaries: Sequence[ProviderSummary], baseline: str) -> dict[str, float]:
    """Other provider's latency at the largest context divided by ``baseline``'s (>1: baseline faster)."""
    base = next(s for s in summaries if s.provider == baseline)
    return {s.provider: s.max_latency_s / base.max_latency_s for s in summaries if s.provider != baseline}


def group_rows(rows: Iterable[QueryRow]) -> dict[str, list[QueryRow]]:
    by: dict[str, list[QueryRow]] = {}
    for r in rows:
        by.setdefault(r.provider, []).append(r)
    return by


def ingest_lags(
    acks: Sequence[float], targets: Sequence[float], samples: Sequence[tuple[float, int]]
) -> list[float | None]:
    """Lag of each append: time of the first session sample taken at or after its acknowledgement whose
    ``context_tokens`` reaches its target, minus the acknowledgement time; None if never reached.
    ``samples`` are (time, context_tokens) in time order; sample times are when the reply arrived,
    so each lag is an upper bound (by at most one poll interval plus one round trip)."""
    out: list[float | None] = []
    j = 0
    for ack, target in zip(acks, targets):
        while j < len(samples) and (samples[j][0] < ack or samples[j][1] < target):
            j += 1
        if j == len(samples):
            out.extend([None] * (len(acks) - len(out)))
            break
        out.append(samples[j][0] - ack)
        # Acks and targets only grow, so the next append's cover is never earlier: keep j.
    return out


def summary_line(summaries: Sequence[ProviderSummary], largest: int, baseline: str) -> str:
    """One line: latency at the largest context, speed-ups of ``baseline``, growth ratios, ingest lag."""
    at_max = ", ".join(f"{s.provider} {s.max_latency_s:.2f}s" for s in summaries)
    growth = ", ".join(f"{s.provider} {s.growth:.2f}x" for s in summaries)
    parts = [f"streaming: latency near {largest} ctx tokens: {at_max}", f"latency max/~1k: {growth}"]
    if any(s.provider == baseline for s in summaries):
        ups = ", ".join(f"{v:.1f}x vs {p}" for p, v in speedups(summaries, baseline).items())
        if ups:
            parts.insert(1, f"{baseline} speed-up {ups}")
        b = next(s for s in summaries if s.provider == baseline)
        if b.ingest_lag_p50_s is not None:
            parts.append(f"ingest lag p50 {b.ingest_lag_p50_s:.2f}s p95 {b.ingest_lag_p95_s:.2f}s")
    return " | ".join(parts)


def markdown_report(
    table: Sequence[BucketStat], summaries: Sequence[ProviderSummary], largest: int, baseline: str
) -> str:
    """The closing note: the bucket table, the growth ratio per provider, speed-ups and ingest lag."""
    lines = ["| provider | context | n | p50 latency (s) | p95 latency (s) |", "|---|---|---:|---:|---:|"]
    lines += [f"| {b.provider} | {b.bucket} | {b.n} | {b.p50_s:.3f} | {b.p95_s:.3f} |" for b in table]
    lines += [
        "",
        "| provider | ctx @~1k | p50 @~1k (s) | ctx @max | p50 @max (s) | max ÷ ~1k | ingest lag p50/p95 (s) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        lag = "" if s.ingest_lag_p50_s is None else f"{s.ingest_lag_p50_s:.3f} / {s.ingest_lag_p95_s:.3f}"
        lines.append(
            f"| {s.provider} | {s.ref_context:.0f} | {s.ref_latency_s:.3f} | {s.max_context:.0f} "
            f"| {s.max_latency_s:.3f} | {s.growth:.2f} | {lag} |"
        )
    lines += ["", summary_line(summaries, largest, baseline)]
    return "\n".join(lines) + "\n"


def plot_latency(
    rows: Sequence[QueryRow], path: str | Path, title: str = "Query latency vs accumulated context"
) -> Path:
    """PNG: latency (log scale) against context tokens, one line per provider."""
    fig, ax = pyplot().subplots(figsize=(8, 5))
    for provider, rs in group_rows(rows).items():
        rs = sorted(rs, key=lambda r: r.context_tokens)
        ax.plot([r.context_tokens for r in rs], [r.latency_s for r in rs], marker="o", ms=3, label=provider)
    ax.set_yscale("log")
    ax.set_xlabel("accumulated context (tokens)")
    ax.set_ylabel("query latency (s, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)
