"""Per-turn latency of one long session: vllm-stateful vs stock vLLM (with and without prefix caching).

One seeded conversation of N turns (token ids: `--new-tokens` per turn, `--max-tokens` greedy reply).
vllm-stateful runs all N turns as a session (each turn sends only its new tokens). The stateless
baselines then replay the *same* token histories (greedy, so identical) with the full history each turn,
for the first and last `--window` turns; before the last window the prefix-cache baseline replays the
turn just before it, so its cache is as warm as it would be in a full run. Servers run one at a time,
back to back, on one machine and one model. Writes CSV, PNG and summary.md (with the machine) to --out-dir.

    python benchmarks/session_turn_latency.py [--model small] [--turns 150] [--window 10]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from harness.http import check
from harness.machine import cpu_env, machine_info, machine_line, model_dir
from harness.results import out_path, pyplot, record_command, save_figure, summary_header, write_rows, write_text
from harness.servers import launched_server

FIELDS = "provider turn context_tokens sent_tokens cached_tokens recomputed_tokens ttft_s total_s".split()


def timed_completion(base: str, body: dict) -> tuple[dict, float, float]:
    """Stream one completion; return (final usage/session fields and generated token_ids, ttft, total seconds)."""
    start = time.perf_counter()
    ttft, final, token_ids = None, {}, []
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    with httpx.stream("POST", base + "/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            check(r)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                ttft = ttft or time.perf_counter() - start
                token_ids += chunk["choices"][0].get("token_ids") or []
            final.update({k: v for k, v in chunk.items() if k in ("usage", "session")})
    final["token_ids"] = token_ids
    return final, ttft or 0.0, time.perf_counter() - start


def run_stateful(base: str, model: str, turns: list[list[int]], max_tokens: int) -> tuple[list[dict], list[list[int]]]:
    rows, prompts, history = [], [], []
    for i, new in enumerate(turns, 1):
        prompts.append(history + new)
        final, ttft, total = timed_completion(
            base,
            {"model": model, "prompt": new, "max_tokens": max_tokens, "temperature": 0, "stateful": "latency-bench"},
        )
        s = final["session"]
        history = history + new + final["token_ids"]
        rows.append(
            {
                "provider": "stateful",
                "turn": i,
                "context_tokens": s["context_tokens"],
                "sent_tokens": len(new),
                "cached_tokens": final["usage"]["prompt_tokens_details"]["cached_tokens"],
                "recomputed_tokens": s["recomputed_tokens"],
                "ttft_s": ttft,
                "total_s": total,
            }
        )
    httpx.delete(base + "/sessions/latency-bench", timeout=60)
    return rows, prompts


def run_stateless(
    label: str, base: str, model: str, prompts: list[list[int]], which: list[int], max_tokens: int, warm: list[int]
) -> list[dict]:
    rows = []
    for turn in sorted(set(which) | set(warm)):
        final, ttft, total = timed_completion(
            base, {"model": model, "prompt": prompts[turn - 1], "max_tokens": max_tokens, "temperature": 0}
        )
        if turn in which:
            details = final["usage"].get("prompt_tokens_details") or {}
            rows.append(
                {
                    "provider": label,
                    "turn": turn,
                    "context_tokens": len(prompts[turn - 1]),
                    "sent_tokens": len(prompts[turn - 1]),
                    "cached_tokens": details.get("cached_tokens") or 0,
                    "recomputed_tokens": "",
                    "ttft_s": ttft,
                    "total_s": total,
                }
            )
    return rows


def summarize(rows: list[dict], first: list[int], last: list[int]) -> str:
    lines = [
        "| provider | context at turn 1 / N | TTFT turns 1-W (s) | TTFT last W (s) | last/first | "
        "total turns 1-W (s) | total last W (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in rows:
        by.setdefault(r["provider"], {})[r["turn"]] = r
    for name, turns in by.items():
        f = [turns[t] for t in first if t in turns]
        la = [turns[t] for t in last if t in turns]
        mf, ml = (statistics.mean(x["ttft_s"] for x in g) for g in (f, la))
        tf, tl = (statistics.mean(x["total_s"] for x in g) for g in (f, la))
        lines.append(
            f"| {name} | {f[0]['context_tokens']} / {la[-1]['context_tokens']} | {mf:.3f} | {ml:.3f} | "
            f"{ml / mf:.1f}x | {tf:.3f} | {tl:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r["provider"] for r in rows):
        pts = sorted((r["turn"], r["ttft_s"]) for r in rows if r["provider"] == name)
        ax.plot(
            *zip(*pts),
            marker="." if name != "stateful" else None,
            linestyle="-" if name == "stateful" else "",
            label=name,
        )
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.set_title("Per-turn TTFT of one long session")
    ax.legend()
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny | small | a model directory")
    p.add_argument("--turns", type=int, default=150)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=out_path("benchmarks/results/sessions"))
    args = p.parse_args(argv)
    model_path = str(model_dir(args.model))
    rng = random.Random(args.seed)
    turns = [[rng.randrange(100, 3000) for _ in range(args.new_tokens)] for _ in range(args.turns)]
    first = list(range(1, args.window + 1))
    last = list(range(args.turns - args.window + 1, args.turns + 1))
    common = ["--block-size", "32", "--max-model-len", "8192", "--enforce-eager", "--enable-prompt-tokens-details"]
    runs = [
        ("stateful", "stateful", []),
        ("vllm-apc", "vllm", ["--enable-prefix-caching"]),
        ("vllm-no-apc", "vllm", ["--no-enable-prefix-caching"]),
    ]
    rows: list[dict] = []
    prompts: list[list[int]] = []
    for label, kind, extra in runs:
        log = args.out_dir / "tmp" / f"{label}.log"
        with launched_server(kind, model_path, "bench", common + extra, log, cpu_env()) as base:
            timed_completion(base, {"model": "bench", "prompt": [5, 6, 7], "max_tokens": 2})  # warm-up
            if label == "stateful":
                got, prompts = run_stateful(base, "bench", turns, args.max_tokens)
            else:
                warm = [last[0] - 1] if label == "vllm-apc" else []
                got = run_stateless(label, base, "bench", prompts, first + last, args.max_tokens, warm)
            rows += got
            print(f"{label}: {len(got)} turns measured")
    write_rows(rows, args.out_dir / "turn_latency.csv", FIELDS)
    table = summarize(rows, first, last)
    plot(rows, args.out_dir / "turn_latency.png")
    details = f"model `{args.model}`; {args.new_tokens} new tokens + {args.max_tokens} generated per turn."
    head = summary_header(f"Per-turn latency, {args.turns}-turn session", details, machine_line(machine_info()))
    write_text(f"{head}{table}\n", args.out_dir / "summary.md")
    print(table)
    recomputed = sum(r["recomputed_tokens"] for r in rows if r["provider"] == "stateful")
    print(f"stateful: recomputed tokens over {args.turns} turns = {recomputed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
