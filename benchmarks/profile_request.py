"""Where one session request's time goes, as its context grows: a sampled CPU profile by stage.

Starts one vllm-stateful server (``--model``, default ``tiny``), grows one session to each context
in ``--contexts`` (default 1k, 8k, 32k tokens; one session each), then sends ``--requests`` read-only
16-token turns per context (``stateful_commit: false``, so the context stays put) in ``--rounds``
interleaved rounds (each round visits every context) while py-spy samples every process of the server
(API server, engine core, worker) at ``--rate`` Hz. Each sample's stack is put in one stage
(``STAGES``: first match from the innermost frame outwards wins), each stage's CPU time is divided by
the round's requests, and the table holds each stage's median over the rounds: a stall of this shared
machine lands in one round of one context and does not move the median. ``forward`` is split into the
attention read (frames in attention code) and the rest of the model. Client latency (mean, p50) is
measured at the same time.

Reading the table: everything except ``forward_*`` and ``idle_loop`` is per-request overhead; a
stage that grows with context outside the attention read is an O(history) step to remove.

    python benchmarks/profile_request.py [--model tiny] [--contexts 1000,8000,32000] [--requests 60]
        [--rounds 3] [--compare-references]

``--compare-references``: the same measurement twice, one server after the other, first with every
prompt sent whole (``prefix_references: false``), then with prefix references (the default): both
tables, and the overhead of each side by side (``profile.csv`` then has a ``prefix_references`` column).

Needs py-spy (``pip install py-spy``) and permission to ptrace the server (same user, or root).
Writes ``profile.csv``, ``summary.md``, ``machine.json`` and the raw collapsed stacks per context
(``stacks-N-R.txt``, large: not committed) to ``--out-dir`` (default ``benchmarks/results/profile_request``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from harness.config import int_list
from harness.http import append_wait, check, post_timed
from harness.machine import corpus_ids, cpu_env, machine_info, machine_line, model_dir
from harness.results import out_path, record_command, summary_header, write_json, write_rows, write_text
from harness.servers import launched_server

SESSION = "profile"

# (stage, substrings of a frame "function (file:line)"); checked from the innermost frame outwards,
# so a hashing frame inside request creation counts as hashing. Order within the tuple does not matter.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("worker_busy_poll", ("SpinCondition.wait", "sched_yield", "should_warn", "acquire_read.<locals>.check")),
    ("forward_attention", ("attention", "Attention", "attn", "Attn", "sdpa")),
    ("forward_other", ("execute_model", "model_runner", "forward (", "torch/nn/")),
    ("engine_block_hashing", ("block_hash", "hash_block_tokens", "sha256", "xxhash", "cbor")),
    ("engine_request_creation", ("preprocess_add_request", "from_engine_core_request", "Request.__init__")),
    (
        "engine_prefix_lookup",
        ("get_computed_blocks", "_get_local_prefix_cache_hit", "common_prefix_len", "find_longest_cache_hit"),
    ),  # fmt: skip
    ("engine_scheduling", ("schedule (", "allocate_slots", "update_from_output", "_free_request")),
    ("ipc_serialization", ("msgspec", "serial_utils", "encode (", "decode (", "zmq", "pickle")),
    ("api_render_tokenize", ("tokeniz", "render", "chat_template", "apply_chat", "encode_prompt")),
    ("api_output_processing", ("output_processor", "detokeniz", "logprobs", "OutputProcessor")),
    ("api_plugin", ("vllm_stateful/server", "vllm_stateful/sessions")),
    ("api_http_json", ("uvicorn", "starlette", "fastapi", "h11", "json", "pydantic", "httptools")),
    # the event loop itself (uvloop runs in C: its own callbacks and its epoll wait look the same)
    ("api_event_loop_other", ("Runner.run (",)),
)
OVERHEAD_STAGES = [s for s, _ in STAGES if not s.startswith(("forward", "worker_busy"))] + ["other"]


def stage_of(frames: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first). A busy-poll frame anywhere in the
    stack wins (vLLM's CPU worker spins on its shared-memory queue between steps: CPU time, no work)."""
    poll, *others = STAGES
    if any(n in frame for frame in frames for n in poll[1]):
        return poll[0]
    for frame in reversed(frames):
        for stage, needles in others:
            if any(n in frame for n in needles):
                return stage
    return "other"


def is_idle(frames: list[str]) -> bool:
    """A stack parked in a wait (poll, select, queue get, sleep, an idle pool thread): not request work."""
    innermost = frames[-1] if frames else ""
    waits = ("poll (", "select (", "wait (", "_wait_for_tstate_lock", "sleep", "get (", "recv", "epoll",
             "_worker (concurrent/futures/thread.py:81)")  # fmt: skip
    return any(w in innermost for w in waits)


def tally(collapsed: str) -> Counter[str]:
    """Samples per stage from py-spy's ``--format raw`` output (``frame;frame;... count`` lines)."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        counts["idle_loop" if is_idle(frames) else stage_of(frames)] += int(n)
    return counts


@dataclass(frozen=True)
class Measured:
    context: int
    requests: int
    latency_mean_s: float
    latency_p50_s: float
    seconds_per_request: dict[str, float]
    round_overheads_s: tuple[float, ...] = ()  # each round's overhead (the table holds medians)

    def overhead_s(self) -> float:
        return sum(self.seconds_per_request.get(s, 0.0) for s in OVERHEAD_STAGES)


class Sampler:
    """py-spy recording every process of the server's tree until ``stop``."""

    def __init__(self, pid: int, rate: int, out: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.out = out
        argv = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", str(rate),
                "--format", "raw", "--output", str(out), "--duration", "3600"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(2.0)  # attach to every process before the first request

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=120)
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
        return self.out.read_text()


def grow(client: httpx.Client, session: str, context: int, tokens: list[int]) -> int:
    """Append ``tokens`` to ``session`` until it holds ``context``; returns its size."""
    have = 0
    while have < context:
        chunk = tokens[have : min(have + 4000, context)]
        append_wait(client, f"/sessions/{session}/append", chunk)
        have += len(chunk)
    return have


def turns(client: httpx.Client, model: str, session: str, n: int, tokens: list[int], rng: random.Random) -> list[float]:
    """``n`` read-only 16-token turns (text taken from ``tokens``), one at a time; client latency of each."""
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(tokens) - 16)
        body = {"model": model, "prompt": tokens[start : start + 16], "max_tokens": 1,
                "temperature": 0, "stateful": session, "stateful_commit": False}  # fmt: skip
        out.append(post_timed(client, "/completions", body)[0])
    return out


def measure(
    base: str,
    pid: int,
    model: str,
    tokens: list[int],
    contexts: list[int],
    n: int,
    rounds: int,
    rate: int,
    out_dir: Path,
) -> list[Measured]:
    """One session per context; ``rounds`` rounds, each sampling ``n // rounds`` turns on every session in
    turn, so a stall of the machine lands in one round of one context. Per stage, the median of the rounds."""
    rng = random.Random(0)
    per_round: dict[int, list[dict[str, float]]] = {c: [] for c in contexts}
    latencies: dict[int, list[float]] = {c: [] for c in contexts}
    sizes: dict[int, int] = {}
    k = max(1, n // rounds)
    with httpx.Client(base_url=base, timeout=600) as client:
        for context in contexts:
            check(client.post("/sessions", json={"id": f"{SESSION}-{context}"}), 200, 201)
            sizes[context] = grow(client, f"{SESSION}-{context}", context, tokens)
        for r in range(rounds):
            for context in contexts:
                session = f"{SESSION}-{context}"
                turns(client, model, session, 3, tokens, rng)  # warm-up at this size
                sampler = Sampler(pid, rate, out_dir / f"stacks-{context}-{r}.txt")
                latencies[context] += turns(client, model, session, k, tokens, rng)
                counts = tally(sampler.stop())
                per_round[context].append({stage: samples / rate / k for stage, samples in counts.items()})
                overhead = sum(per_round[context][-1].get(s, 0.0) for s in OVERHEAD_STAGES)
                print(f"round {r} context {context}: overhead {overhead * 1000:.1f} ms/request", flush=True)
        for context in contexts:
            client.delete(f"/sessions/{SESSION}-{context}")
    results = []
    for context in contexts:
        stages = {stage for one in per_round[context] for stage in one}
        median = {stage: statistics.median(one.get(stage, 0.0) for one in per_round[context]) for stage in stages}
        lat = latencies[context]
        rounds_s = tuple(sum(one.get(s, 0.0) for s in OVERHEAD_STAGES) for one in per_round[context])
        results.append(
            Measured(sizes[context], k * rounds, statistics.mean(lat), statistics.median(lat), median, rounds_s)
        )
    return results


def table(results: list[Measured]) -> str:
    stages = [s for s, _ in STAGES[1:]] + ["other", STAGES[0][0], "idle_loop"]
    head = "| stage (CPU ms per request) | " + " | ".join(f"{r.context} tok" for r in results)
    lines = [head + f" | {results[-1].context}/{results[0].context} |", "|---" * (len(results) + 2) + "|"]

    def row(name: str, values: list[float]) -> str:
        ratio = f"{values[-1] / values[0]:.2f}x" if values[0] > 0 else "-"
        return f"| {name} | " + " | ".join(f"{v * 1000:.2f}" for v in values) + f" | {ratio} |"

    for stage in stages:
        lines.append(row(stage, [r.seconds_per_request.get(stage, 0.0) for r in results]))
    lines.append(row("**overhead (all but forward, busy poll and idle)**", [r.overhead_s() for r in results]))
    lines.append(row("client latency p50", [r.latency_p50_s for r in results]))
    lines.append(row("client latency mean", [r.latency_mean_s for r in results]))
    spread = "; ".join(f"{r.context}: " + ", ".join(f"{v * 1000:.1f}" for v in r.round_overheads_s) for r in results)
    return "\n".join(lines) + f"\n\nOverhead of each round (ms), whose median per stage is above: {spread}"


def comparison(runs: dict[str, list[Measured]]) -> str:
    """Overhead and client p50 per context for each side of an A/B, and the largest ÷ smallest context."""
    head = "| prompt sent | " + " | ".join(f"overhead @{r.context} (ms)" for r in next(iter(runs.values())))
    lines = [head + " | overhead max ÷ min | p50 max ÷ min |", "|---" * (len(next(iter(runs.values()))) + 3) + "|"]
    for name, results in runs.items():
        overhead = [r.overhead_s() for r in results]
        p50 = [r.latency_p50_s for r in results]
        cells = " | ".join(f"{v * 1000:.2f}" for v in overhead)
        lines.append(f"| {name} | {cells} | {overhead[-1] / overhead[0]:.2f}x | {p50[-1] / p50[0]:.2f}x |")
    return "\n".join(lines)


def csv_rows(results: list[Measured], variant: str | None = None) -> list[dict]:
    """``profile.csv``: each stage's CPU seconds per request, then the client latency p50, per context
    (and per side of an A/B: ``prefix_references`` on or off)."""
    rows = []
    extra = {} if variant is None else {"prefix_references": variant}
    for r in results:
        cells = [*sorted(r.seconds_per_request.items()), ("client_latency_p50", r.latency_p50_s)]
        rows += [
            {**extra, "context_tokens": r.context, "stage": stage, "cpu_s_per_request": f"{s:.6f}"}
            for stage, s in cells
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | small | a model directory")
    p.add_argument("--contexts", default="1000,8000,32000")
    p.add_argument("--requests", type=int, default=60, help="turns per context, in all rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the contexts (median per stage)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--out-dir", type=Path, default=out_path("benchmarks/results/profile_request"))
    p.add_argument("--compare-references", action="store_true", help="A/B: prompts sent whole, then referenced")
    args = p.parse_args(argv)
    model, out = str(model_dir(args.model)), args.out_dir
    contexts = sorted(int_list(args.contexts))
    tokens = corpus_ids(model, max(contexts))
    variants = ["off", "on"] if args.compare_references else [None]
    runs: dict[str, list[Measured]] = {}
    for variant in variants:
        plugin: dict = {"max_ingest_queue_tokens": 8192}
        if variant is not None:
            plugin["prefix_references"] = variant == "on"
        server_args = ["--block-size", "32", "--max-model-len", str(max(contexts) + 512), "--enforce-eager",
                       "--additional-config", json.dumps({"stateful": plugin})]  # fmt: skip
        pids: list[int] = []
        log = out / ("server.log" if variant is None else f"server-{variant}.log")
        with launched_server("stateful", model, "bench", server_args, log, cpu_env(), pids=pids) as base:
            stacks = out if variant is None else out / f"references-{variant}"
            stacks.mkdir(parents=True, exist_ok=True)
            runs[variant or "on"] = measure(
                base, pids[0], "bench", tokens, contexts, args.requests, args.rounds, args.rate, stacks
            )
    if args.compare_references:
        rows = [row for name, results in runs.items() for row in csv_rows(results, name)]
        write_rows(rows, out / "profile.csv", ("prefix_references", "context_tokens", "stage", "cpu_s_per_request"))
    else:
        write_rows(csv_rows(runs["on"]), out / "profile.csv", ("context_tokens", "stage", "cpu_s_per_request"))
    info = machine_info()
    write_json(info, out / "machine.json")
    title = (
        f"Per-request CPU profile by stage ({args.model}, {args.requests} read-only 16-token turns per context, "
        f"max_tokens 1, py-spy at {args.rate} Hz over every server process)"
    )
    if args.compare_references:
        body = f"{comparison({f'whole ({k})' if k == 'off' else f'referenced ({k})': v for k, v in runs.items()})}\n\n"
        body += "".join(f"prefix_references {k}:\n\n{table(v)}\n\n" for k, v in runs.items())
    else:
        body = f"{table(runs['on'])}\n\n"
    summary = summary_header(title) + f"{body}{machine_line(info)}\n"
    write_text(summary, out / "summary.md")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
