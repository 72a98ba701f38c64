"""Pure result handling for the chat benchmark: rows, CSV, aggregation, ratio table, plots.

No vLLM, no network, no openai import: everything here is a function of benchmark rows, so it is
unit-tested without a server (``tests/unit/test_benchmark_report.py``).

Column meanings (one row = one turn of one topic for one provider):
- ``prompt_tokens``: tokens the client sent in that request (its messages rendered with the model's
  chat template and tokenized), or the server's ``usage.prompt_tokens`` when no tokenizer was given.
  A stateless client re-sends the whole history; a stateful client sends only the new messages.
- ``cumulative_prompt_tokens``: running sum of ``prompt_tokens`` over the topic's turns so far.
- ``cached_tokens``: server-reported ``usage.prompt_tokens_details.cached_tokens`` (stock vLLM: prefix-cache
  hits inside the prompt; vllm-stateful: session context reused, which is not part of the prompt sent).
- ``recomputed_tokens``: server-reported ``session.recomputed_tokens`` (session tokens prefilled again);
  0 for providers without sessions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from harness.results import columns_of, pyplot, read_rows, save_figure, write_rows

#: Provider labels starting with this are session providers (prompt excludes the reused context).
SESSION_PREFIX = "stateful"


@dataclass(frozen=True)
class Row:
    """One measured turn. ``turn`` is 1-based; ``topic`` is the topic's short name."""

    provider: str
    topic: str
    turn: int
    ttft_s: float
    prompt_tokens: int
    cumulative_prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    completion_tokens: int
    total_s: float


CSV_FIELDS: tuple[str, ...] = columns_of(Row)


def is_session_provider(provider: str) -> bool:
    """True for vllm-stateful providers (label ``stateful`` or ``stateful-...``)."""
    return provider == SESSION_PREFIX or provider.startswith(SESSION_PREFIX + "-")


def prefilled_tokens(row: Row) -> int:
    """Tokens the server actually prefilled for this turn.

    Stateless: the prompt holds the whole history, of which ``cached_tokens`` came from the prefix
    cache, so prefill = ``prompt_tokens - cached_tokens`` (never negative). Session providers send
    only new tokens and the reused context is not part of the prompt, so prefill =
    ``prompt_tokens + recomputed_tokens``.
    """
    if is_session_provider(row.provider):
        return row.prompt_tokens + row.recomputed_tokens
    return max(row.prompt_tokens - row.cached_tokens, 0)


def fill_cumulative(rows: Iterable[Row]) -> list[Row]:
    """Return the rows with ``cumulative_prompt_tokens`` recomputed per (provider, topic) by turn.

    Output order is the input order. Raises ValueError on a duplicate (provider, topic, turn).
    """
    rows = list(rows)
    seen: set[tuple[str, str, int]] = set()
    for r in rows:
        key = (r.provider, r.topic, r.turn)
        if key in seen:
            raise ValueError(f"duplicate row for provider={r.provider} topic={r.topic} turn={r.turn}")
        seen.add(key)
    running: dict[tuple[str, str], int] = {}
    cumulative: dict[tuple[str, str, int], int] = {}
    for r in sorted(rows, key=lambda r: (r.provider, r.topic, r.turn)):
        total = running.get((r.provider, r.topic), 0) + r.prompt_tokens
        running[(r.provider, r.topic)] = total
        cumulative[(r.provider, r.topic, r.turn)] = total
    return [replace(r, cumulative_prompt_tokens=cumulative[(r.provider, r.topic, r.turn)]) for r in rows]


def write_csv(rows: Iterable[Row], path: str | os.PathLike) -> Path:
    """Write rows under the ``CSV_FIELDS`` header (creating parent dirs) and return the path.

    Floats are written with ``repr`` precision, so ``read_csv`` returns rows equal to the input."""
    return write_rows(rows, path, CSV_FIELDS)


def read_csv(path: str | os.PathLike) -> list[Row]:
    """Read rows written by ``write_csv``. Raises ValueError if the header is not ``CSV_FIELDS``."""
    return read_rows(path, Row)


def providers(rows: Iterable[Row]) -> list[str]:
    """Provider labels in order of first appearance."""
    return list(dict.fromkeys(r.provider for r in rows))


def cumulative_prefill(rows: Iterable[Row]) -> dict[tuple[str, str, int], int]:
    """Map (provider, topic, turn) to the tokens prefilled over turns 1..turn of that topic."""
    out: dict[tuple[str, str, int], int] = {}
    running: dict[tuple[str, str], int] = {}
    for r in sorted(rows, key=lambda r: (r.provider, r.topic, r.turn)):
        total = running.get((r.provider, r.topic), 0) + prefilled_tokens(r)
        running[(r.provider, r.topic)] = total
        out[(r.provider, r.topic, r.turn)] = total
    return out


def per_turn_mean(rows: Sequence[Row], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Mean of ``metric`` over topics, per provider and turn: ``{provider: [(turn, mean), ...]}``.

    ``metric`` is a numeric CSV column, ``"prefilled_tokens"`` or ``"cumulative_prefill"``.
    Turns are sorted ascending. Raises ValueError for an unknown metric.
    """
    value = _metric_getter(rows, metric)
    buckets: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        buckets.setdefault(r.provider, {}).setdefault(r.turn, []).append(value(r))
    return {p: [(t, sum(v) / len(v)) for t, v in sorted(by_turn.items())] for p, by_turn in buckets.items()}


def _metric_getter(rows: Sequence[Row], metric: str):
    if metric == "prefilled_tokens":
        return prefilled_tokens
    if metric == "cumulative_prefill":
        table = cumulative_prefill(rows)
        return lambda r: float(table[(r.provider, r.topic, r.turn)])
    if metric in CSV_FIELDS and metric not in ("provider", "topic"):
        return lambda r: float(getattr(r, metric))
    raise ValueError(f"unknown metric {metric!r}")


@dataclass(frozen=True)
class ProviderSummary:
    """Means over topics at one turn for one provider."""

    provider: str
    turn: int
    topics: int
    ttft_s: float
    prompt_tokens: float
    cumulative_prompt_tokens: float
    cumulative_prefill: float


SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("ttft_s", "TTFT (s)"),
    ("prompt_tokens", "prompt tokens sent"),
    ("cumulative_prefill", "cumulative prefill (tokens)"),
)


def summarize(rows: Sequence[Row], turn: int | None = None) -> list[ProviderSummary]:
    """Per-provider means at ``turn`` (default: the last turn every provider reached).

    Providers appear in first-seen order. Raises ValueError if ``rows`` is empty or a provider has
    no row at ``turn``.
    """
    if not rows:
        raise ValueError("no rows to summarize")
    names = providers(rows)
    if turn is None:
        turn = min(max(r.turn for r in rows if r.provider == p) for p in names)
    prefill = cumulative_prefill(rows)
    out = []
    for p in names:
        at = [r for r in rows if r.provider == p and r.turn == turn]
        if not at:
            raise ValueError(f"provider {p!r} has no row at turn {turn}")
        n = len(at)
        out.append(
            ProviderSummary(
                provider=p,
                turn=turn,
                topics=n,
                ttft_s=sum(r.ttft_s for r in at) / n,
                prompt_tokens=sum(r.prompt_tokens for r in at) / n,
                cumulative_prompt_tokens=sum(r.cumulative_prompt_tokens for r in at) / n,
                cumulative_prefill=sum(prefill[(r.provider, r.topic, r.turn)] for r in at) / n,
            )
        )
    return out


def ratio(baseline: float, reference: float) -> float:
    """``baseline / reference``; ``inf`` when only the reference is 0, ``nan`` when both are."""
    if reference == 0:
        return math.nan if baseline == 0 else math.inf
    return baseline / reference


def pick_reference(summaries: Sequence[ProviderSummary], reference: str | None = None) -> str:
    """The provider ratios are taken against: ``reference`` if given, else the first session provider,
    else the last provider. Raises ValueError if ``reference`` is not among the summaries."""
    names = [s.provider for s in summaries]
    if reference is not None:
        if reference not in names:
            raise ValueError(f"reference provider {reference!r} not in {names}")
        return reference
    return next((n for n in names if is_session_provider(n)), names[-1])


def ratio_table(summaries: Sequence[ProviderSummary], reference: str | None = None) -> dict[str, dict[str, float]]:
    """``{baseline: {metric: baseline_value / reference_value}}`` for every non-reference provider
    and every metric in ``SUMMARY_METRICS``."""
    ref_name = pick_reference(summaries, reference)
    ref = next(s for s in summaries if s.provider == ref_name)
    return {
        s.provider: {m: ratio(getattr(s, m), getattr(ref, m)) for m, _ in SUMMARY_METRICS}
        for s in summaries
        if s.provider != ref_name
    }


def _fmt_ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.2f}x")


def format_markdown(summaries: Sequence[ProviderSummary], reference: str | None = None) -> str:
    """A Markdown table of the per-provider means plus ``baseline / reference`` ratio columns."""
    ref_name = pick_reference(summaries, reference)
    ratios = ratio_table(summaries, ref_name)
    turn = summaries[0].turn
    head = [
        "provider",
        "topics",
        f"TTFT turn {turn} (s)",
        f"prompt tokens turn {turn}",
        f"cumulative prefill turn {turn}",
    ]
    head += [f"{label} / {ref_name}" for _, label in SUMMARY_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        r = ratios.get(s.provider)
        cells = [s.provider, str(s.topics), f"{s.ttft_s:.3f}", f"{s.prompt_tokens:.0f}", f"{s.cumulative_prefill:.0f}"]
        cells += [_fmt_ratio(r[m]) if r else "1.00x (ref)" for m, _ in SUMMARY_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def one_line_summary(summaries: Sequence[ProviderSummary], reference: str | None = None) -> str:
    """One line: per-provider TTFT and cumulative prefill at the summary turn, with ratios."""
    ref_name = pick_reference(summaries, reference)
    ratios = ratio_table(summaries, ref_name)
    parts = []
    for s in summaries:
        text = f"{s.provider} TTFT {s.ttft_s:.3f}s prefill {s.cumulative_prefill:.0f}"
        if s.provider in ratios:
            r = ratios[s.provider]
            text += f" ({_fmt_ratio(r['ttft_s'])} TTFT, {_fmt_ratio(r['cumulative_prefill'])} prefill)"
        parts.append(text)
    head = f"turn {summaries[0].turn}" + (f" vs {ref_name}" if ratios else "")
    return f"{head}: " + "; ".join(parts)


PLOT_FILES: tuple[str, ...] = (
    "ttft_per_turn.png",
    "tokens_per_turn.png",
    "cumulative_prefill.png",
    "turn12_summary.png",
)


def plot_all(rows: Sequence[Row], out_dir: str | os.PathLike, reference: str | None = None) -> list[Path]:
    """Render the four PNGs named in ``PLOT_FILES`` into ``out_dir`` and return their paths.

    The summary chart is always written as ``turn12_summary.png`` (the file name the docs link to);
    its title names the turn actually summarized.
    """
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in PLOT_FILES]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, per_turn_mean(rows, "ttft_s"), "time to first token (s)", "TTFT per turn (mean over topics)")
    save_figure(fig, paths[0])

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    _lines(a1, per_turn_mean(rows, "prompt_tokens"), "tokens", "prompt tokens sent per turn")
    _lines(a2, per_turn_mean(rows, "prefilled_tokens"), "tokens", "tokens prefilled by the server per turn")
    save_figure(fig, paths[1])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, per_turn_mean(rows, "cumulative_prefill"), "tokens", "cumulative prefill (mean over topics)")
    save_figure(fig, paths[2])

    summaries = summarize(rows)
    names = [s.provider for s in summaries]
    fig, axes = plt.subplots(1, len(SUMMARY_METRICS), figsize=(4 * len(SUMMARY_METRICS), 4.5))
    for ax, (metric, label) in zip(axes, SUMMARY_METRICS):
        values = [getattr(s, metric) for s in summaries]
        bars = ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(label)
    fig.suptitle(f"turn {summaries[0].turn} summary (ratios vs {pick_reference(summaries, reference)} in summary.md)")
    save_figure(fig, paths[3])
    return paths


def plot_overview(rows: Sequence[Row], path: str | os.PathLike) -> Path:
    """One PNG with three panels per turn: mean TTFT, mean prompt tokens sent, mean cumulative
    prefill (for a single benchmark run; ``plot_all`` is the comparison set). Returns the path."""
    fig, axes = pyplot().subplots(1, 3, figsize=(16, 4.5))
    _lines(axes[0], per_turn_mean(rows, "ttft_s"), "seconds", "TTFT per turn")
    _lines(axes[1], per_turn_mean(rows, "prompt_tokens"), "tokens", "prompt tokens sent per turn")
    _lines(axes[2], per_turn_mean(rows, "cumulative_prefill"), "tokens", "cumulative prefill")
    return save_figure(fig, path)


def _lines(ax, series: dict[str, list[tuple[int, float]]], ylabel: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    styles = ("-", "--", ":", "-.")
    for i, (name, points) in enumerate(series.items()):
        ax.plot(
            [t for t, _ in points],
            [v for _, v in points],
            marker="os^Dv"[i % 5],
            linestyle=styles[i % len(styles)],
            label=name,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("turn")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
