"""CPU dtype A/B: the ``small`` demo model's prefill and decode speed in bfloat16 (the default before
``serve`` chose the dtype from the CPU's features) vs what ``vllm-stateful serve`` chooses now.

For each ISA mode, two vllm-stateful servers, one after the other, on the same model files:
``bfloat16`` (``--dtype bfloat16``) and ``serve's choice`` (no ``--dtype``; the server log's
"serving in ..." line is recorded). ISA modes: ``native`` (this CPU as it is) and ``avx2`` (an AVX-512
CPU made to look AVX2-only: vLLM's ``_C_AVX2`` kernels, ATen and oneDNN capped at AVX2, the dtype
chosen from the flags without avx512*/amx*; see ``harness/avx2/sitecustomize.py``; the model is
the demo model as ``serve`` writes it there). An emulation keeps this CPU's caches and clocks.

Per server: one warm-up, ``--prompts`` prompts of ``--prompt-tokens`` tokens of ordinary text (no shared block) with
``max_tokens`` 1 (prefill tokens/s = tokens / latency), then one ``--decode-tokens`` generation
(decode ms/token = (latency - TTFT) / (tokens - 1)).

    python benchmarks/dtype_prefill.py                      # native and avx2, small model
    python benchmarks/dtype_prefill.py --isa avx2 --prompt-tokens 256 --prompts 2

Outputs (``--out-dir``): ``dtype_prefill.csv``, ``summary.md``, ``summary.json``; server logs under
``logs/``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from harness.config import select
from harness.http import post_timed, stream_completion
from harness.machine import avx2_env, corpus_ids, cpu_env, machine_info, machine_line
from harness.results import out_path, record_command, summary_header, write_json, write_rows, write_text
from harness.servers import launched_server

ISAS = ("native", "avx2")
CONFIGS = {"bfloat16": ["--dtype", "bfloat16"], "serve's choice": []}
SERVED = "bench"


@dataclass
class Result:
    isa: str
    config: str
    dtype: str
    prompt_tokens: int
    prefill_s: float
    prefill_tokens_per_s: float
    decode_ms_per_token: float


def isa_env(isa: str) -> dict[str, str]:
    return avx2_env() if isa == "avx2" else {}


def demo_model(size: str, isa: str) -> str:
    """The demo model directory ``serve`` would write on that ISA (built on first use)."""
    code = f"from vllm_stateful.demo_model import ensure_demo_model; print(ensure_demo_model({size!r}))"
    env = {**os.environ, **isa_env(isa)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout.split()[-1]


def chosen_dtype(log: Path, args: list[str]) -> str:
    if "--dtype" in args:
        return args[args.index("--dtype") + 1]
    found = re.search(r"vllm-stateful: serving in (\w+)", log.read_text(errors="replace"))
    return found.group(1) if found else "?"


def measure(api: str, model: str, a: argparse.Namespace) -> tuple[list[float], float]:
    """(prefill latencies, decode ms/token) on a server at ``api`` serving ``model``. Prompts are
    ordinary text from different places of the corpus, so no prompt shares a cached block."""
    offsets = iter(range(a.seed * 100_003 + 7919, 10**9, 7919))

    def text(n: int) -> list[int]:
        return corpus_ids(model, n, offset=next(offsets))

    with httpx.Client(timeout=1800) as client:
        body = {"model": SERVED, "max_tokens": 1, "temperature": 0}
        post_timed(client, f"{api}/completions", {**body, "prompt": text(32)})  # warm-up
        prefill = [
            post_timed(client, f"{api}/completions", {**body, "prompt": text(a.prompt_tokens)})[0]
            for _ in range(a.prompts)
        ]
        out = stream_completion(client, api, {"prompt": text(16), "max_tokens": a.decode_tokens}, SERVED)
    n = int(out.usage["completion_tokens"])
    return prefill, 1000 * (out.latency_s - (out.ttft_s or 0.0)) / max(n - 1, 1)


def run(a: argparse.Namespace, out: Path) -> list[Result]:
    rows: list[Result] = []
    for isa in select(ISAS, a.isa, "ISA modes"):
        model = demo_model(a.model, isa)
        for config, args in CONFIGS.items():
            log = out / "logs" / f"{isa}-{config.split()[-1]}.log"
            env = {**cpu_env(), **isa_env(isa)}
            print(f"[{isa} / {config}] {model}", file=sys.stderr, flush=True)
            with launched_server("stateful", model, SERVED, args, log, env) as api:
                prefill, decode_ms = measure(api, model, a)
            seconds = sorted(prefill)[len(prefill) // 2]
            row = Result(
                isa, config, chosen_dtype(log, args), a.prompt_tokens, seconds, a.prompt_tokens / seconds, decode_ms
            )
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def table(rows: list[Result]) -> str:
    lines = [
        "| ISA | server | dtype | prefill tokens/s | decode ms/token | prefill vs bfloat16 |",
        "|---|---|---|---|---|---|",
    ]
    base = {r.isa: r.prefill_tokens_per_s for r in rows if r.config == "bfloat16"}
    for r in rows:
        ratio = r.prefill_tokens_per_s / base[r.isa] if r.isa in base else float("nan")
        speed = f"{r.prefill_tokens_per_s:.1f} | {r.decode_ms_per_token:.1f}"
        lines.append(f"| {r.isa} | {r.config} | {r.dtype} | {speed} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", choices=("tiny", "small"))
    ap.add_argument("--isa", default="native,avx2", help="comma-separated subset of native, avx2 (emulated)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=3, help="prefill latency = the median of these")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results/dtype_prefill")
    a = ap.parse_args(argv)
    out = out_path(a.out_dir)
    rows = run(a, out)
    machine = machine_info()
    write_rows(rows, out / "dtype_prefill.csv")
    details = f"`{a.model}` model, {a.prompts} prompts of {a.prompt_tokens} tokens, {a.decode_tokens}-token decode"
    note = "\navx2 = this CPU with vLLM, ATen and oneDNN capped at AVX2 (an emulation: same caches and clocks).\n"
    text = table(rows)
    write_text(
        summary_header("CPU dtype: bfloat16 vs serve's choice", details, machine_line(machine)) + text + note,
        out / "summary.md",
    )
    write_json({"machine": machine, "args": vars(a), "rows": [asdict(r) for r in rows]}, out / "summary.json")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
