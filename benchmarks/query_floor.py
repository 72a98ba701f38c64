"""The engine's floor for a question as context grows: the same question over a cached context, nothing else running.

The streaming benchmark's must-show compares a question's latency at ~7.4k tokens of context with
its latency at ~1k. Part of that growth is the attention read itself: the question's prefill and
each decode step attend over the whole context. This script measures that part alone, on stock vLLM
(prefix caching on, the context cached, contexts a multiple of the block size so only the question
is computed) and on a vllm-stateful session holding the same tokens, one server after the other:

- per context L and repeat: a fresh ``--question-tokens`` question of corpus text (different each
  repeat), ``--max-tokens`` generated greedily, streamed; latency to the last byte and TTFT;
- stock: prompt = the L context tokens + the question (the context warmed once, untimed);
- stateful: a read-only (``stateful_commit: false``) completion on a session created with the L tokens.

The floor ratio is stock's p50 at the largest L ÷ at the smallest: no server on this engine and CPU
answers a question of this shape with a flatter curve, whatever it keeps resident.

    python benchmarks/query_floor.py [--model small] [--contexts 992,4000,7392] [--repeats 7]

Writes ``query_floor.csv``, ``summary.md`` and ``machine.json`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import httpx
from harness.config import int_list
from harness.http import check, post_timed, stream_completion
from harness.machine import corpus_ids, cpu_env, machine_info, machine_line, model_dir, with_dtype
from harness.results import out_path, record_command, summary_header, write_json, write_rows, write_text
from harness.servers import launched_server

COLUMNS = ("provider", "context", "repeat", "latency_s", "ttft_s", "decode_s")
BLOCK = 32


def question(model: str, n: int, repeat: int) -> list[int]:
    """A different stretch of corpus text per repeat, far from the context's start."""
    return corpus_ids(model, n, offset=50_000 + 997 * repeat)


def run_stock(base: str, model: str, contexts: list[int], q_tokens: int, max_tokens: int, repeats: int) -> list[dict]:
    rows = []
    with httpx.Client(timeout=900) as client:
        for ctx in contexts:
            context = corpus_ids(model, ctx)
            post_timed(client, f"{base}/completions", {"model": "bench", "prompt": context, "max_tokens": 1})
            for r in range(repeats):
                out = stream_completion(
                    client, base, {"prompt": context + question(model, q_tokens, r), "max_tokens": max_tokens}, "bench"
                )
                rows.append(_row("vllm-prefix-cache", ctx, r, out.latency_s, out.ttft_s))
    return rows


def run_stateful(
    base: str, model: str, contexts: list[int], q_tokens: int, max_tokens: int, repeats: int
) -> list[dict]:
    rows = []
    with httpx.Client(timeout=900) as client:
        for ctx in contexts:
            sid = f"floor-{ctx}"
            check(client.post(f"{base}/sessions", json={"id": sid, "prompt": corpus_ids(model, ctx)}), 200, 201)
            for r in range(repeats):
                body = {"prompt": question(model, q_tokens, r), "max_tokens": max_tokens,
                        "stateful": sid, "stateful_commit": False}  # fmt: skip
                out = stream_completion(client, base, body, "bench")
                if out.session is None or out.session.get("recomputed_tokens") != 0:
                    raise SystemExit(f"session query recomputed context: {out.session}")
                rows.append(_row("vllm-stateful", ctx, r, out.latency_s, out.ttft_s))
            client.delete(f"{base}/sessions/{sid}")
    return rows


def _row(provider: str, ctx: int, repeat: int, latency: float, ttft: float | None) -> dict:
    ttft = ttft if ttft is not None else latency
    return {"provider": provider, "context": ctx, "repeat": repeat, "latency_s": latency, "ttft_s": ttft,
            "decode_s": latency - ttft}  # fmt: skip


def summarize(rows: list[dict], contexts: list[int]) -> tuple[list[str], dict]:
    lines = ["| provider | context | p50 latency (s) | p50 TTFT (s) | p50 decode part (s) | latency ÷ smallest |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    ratios: dict = {}
    for provider in sorted({r["provider"] for r in rows}):
        p50 = {}
        for ctx in contexts:
            mine = [r for r in rows if r["provider"] == provider and r["context"] == ctx]
            p50[ctx] = {k: statistics.median(r[k] for r in mine) for k in ("latency_s", "ttft_s", "decode_s")}
        for ctx in contexts:
            ratio = p50[ctx]["latency_s"] / p50[contexts[0]]["latency_s"]
            lines.append(f"| {provider} | {ctx} | {p50[ctx]['latency_s']:.3f} | {p50[ctx]['ttft_s']:.3f} | "
                         f"{p50[ctx]['decode_s']:.3f} | {ratio:.2f} |")  # fmt: skip
        growth = p50[contexts[-1]]["latency_s"] / p50[contexts[0]]["latency_s"]
        ratios[provider] = {"p50": p50, "largest_over_smallest": growth}
    return lines, ratios


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny | small | a model directory")
    p.add_argument("--contexts", type=int_list, default="992,4000,7392", help=f"rounded down to a multiple of {BLOCK}")
    p.add_argument("--question-tokens", type=int, default=25)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--providers", default="vllm-prefix-cache,vllm-stateful")
    p.add_argument("--out-dir", type=Path, default=out_path("benchmarks/results/query_floor"))
    args = p.parse_args(argv)
    contexts = sorted({c - c % BLOCK for c in args.contexts})
    model = str(model_dir(args.model))
    common = with_dtype(["--block-size", str(BLOCK), "--max-model-len", "8192", "--enforce-eager"], args.model)
    shape = (model, contexts, args.question_tokens, args.max_tokens, args.repeats)
    rows: list[dict] = []
    for provider in args.providers.split(","):
        log = args.out_dir / f"{provider}.log"
        if provider == "vllm-prefix-cache":
            with launched_server("vllm", model, "bench", [*common, "--enable-prefix-caching"], log, cpu_env()) as base:
                rows += run_stock(base, *shape)
        elif provider == "vllm-stateful":
            with launched_server("stateful", model, "bench", common, log, cpu_env()) as base:
                rows += run_stateful(base, *shape)
        else:
            raise SystemExit(f"unknown provider {provider!r}")
    write_rows(rows, args.out_dir / "query_floor.csv", COLUMNS)
    lines, ratios = summarize(rows, contexts)
    info = machine_info()
    write_json({"machine": info, "ratios": ratios, "contexts": contexts}, args.out_dir / "machine.json")
    details = (f"model `{args.model}`, {args.question_tokens}-token question + {args.max_tokens} generated, "
               f"median of {args.repeats}")  # fmt: skip
    head = summary_header("Question latency floor vs context", details, machine_line(info))
    write_text(head + "\n".join(lines) + "\n", args.out_dir / "summary.md")
    print("\n".join(lines))
    for provider, r in ratios.items():
        print(f"{provider}: largest ÷ smallest context {r['largest_over_smallest']:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
