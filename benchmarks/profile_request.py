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

Each stage's time is CPU time: every process's user + system seconds over the round (from the kernel,
exact) split over stages in proportion to its samples that used CPU (``cpu_by_stage``): py-spy on a
loaded 2-core machine drops samples unevenly, so sample counts are not times, their proportions are.

Reading the table: everything except ``forward_*`` and the waits (``WAIT_STAGES``) is per-request
overhead; a stage that grows with context outside the attention read is an O(history) step to remove.
The waits grow with how long a request is in flight (mostly its forward), not with work: ``busy_poll``
(spinning on vLLM's shared-memory ring: the worker for the next step, the engine core for the worker's
output) and ``unreadable_stack``; ``event_loop_wait`` (the API server's event loop in ``epoll``) and
``idle_loop`` are threads blocked in the kernel, which take no share of the CPU time. ``WAIT_STAGES``
says how each was established.

    python benchmarks/profile_request.py [--model tiny] [--contexts 1000,8000,32000] [--requests 60]
        [--rounds 3] [--compare-references]

``--compare-references``: the same measurement twice, one server after the other, first with every
prompt sent whole (``prefix_references: false``), then with prefix references (the default): both
tables, and the overhead of each side by side (``profile.csv`` then has a ``prefix_references`` column).

The worker's per-step bookkeeping (``worker_bookkeeping``: new requests into its input batch, block
tables, inputs) runs under ``execute_model`` but is overhead, not forward. Each round's CPU seconds and
sample counts per process are in ``rounds.csv`` (next to the stacks), to check the split against.

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
SETTLE_S = 1.5  # longer than vLLM's worker busy loop keeps spinning after a step (1 s)

# (stage, substrings of a frame "function (file:line)"); checked from the innermost frame outwards,
# so a hashing frame inside request creation counts as hashing. Order within the tuple does not matter.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # waiting on the other process through vLLM's shared-memory ring (the worker for the next step, the
    # engine core for the worker's output): CPU time spent spinning, no work; it grows with the forward
    ("busy_poll", ("SpinCondition.wait", "sched_yield", "should_warn", "acquire_read.<locals>.check")),
    ("forward_attention", ("attention", "Attention", "attn", "Attn", "sdpa")),
    # the worker's per-step bookkeeping: new requests into its input batch, block tables, inputs
    ("worker_bookkeeping", ("_update_states", "_prepare_inputs", "gpu_input_batch", "block_table")),
    ("forward_other", ("execute_model", "model_runner", "forward (", "torch/nn/")),
    ("engine_block_hashing", ("block_hash", "hash_block_tokens", "sha256", "xxhash", "cbor")),
    ("engine_request_creation", ("preprocess_add_request", "from_engine_core_request", "Request.__init__")),
    (
        "engine_prefix_lookup",
        ("get_computed_blocks", "_get_local_prefix_cache_hit", "common_prefix_len", "find_longest_cache_hit"),
    ),  # fmt: skip
    ("engine_scheduling", ("schedule (", "allocate_slots", "update_from_output", "_free_request")),
    ("ipc_serialization", ("msgspec", "serial_utils", "encode (", "decode (", "zmq", "pickle", "MessageQueue.")),
    ("api_render_tokenize", ("tokeniz", "render", "chat_template", "apply_chat", "encode_prompt")),
    ("api_output_processing", ("output_processor", "detokeniz", "logprobs", "OutputProcessor")),
    ("api_plugin", ("vllm_stateful/server", "vllm_stateful/sessions")),
    ("api_http_json", ("uvicorn", "starlette", "fastapi", "h11", "json", "pydantic", "httptools")),
)
# The innermost frame of a sample spinning in the shared-memory ring's read loop (its body, once a
# message is there, runs in the caller's frame: ``MessageQueue.dequeue``, which is not a wait).
RING_WAIT_FRAMES = ("MessageQueue.acquire_read (", "ReadTimeoutWithWarnings.", "memory_fence (")
# Not request work, and not overhead, each shown in the table:
# - ``event_loop_wait``: the API server's innermost Python frame is the event loop's ``run``: uvloop's C
#   code, which a native profile of the server under this load found in ``epoll_pwait`` in 98% of samples
#   (waiting for the engine's output); it grows with how long a request is in flight.
# - ``unreadable_stack``: a thread with no Python frame. A blocking native profile of the engine core
#   under this load had no such samples, and in the worker their count follows its busy poll, not its
#   forward: stacks that ``--nonblocking`` sampling read mid-change (mostly a main thread's busy poll).
WAIT_STAGES = ("busy_poll", "event_loop_wait", "unreadable_stack", "idle_loop")
# samples of a thread blocked in the kernel, using no CPU: no share of the process's CPU time
NO_CPU_STAGES = ("idle_loop", "event_loop_wait")
OVERHEAD_STAGES = [s for s, _ in STAGES if not s.startswith("forward") and s not in WAIT_STAGES] + [
    "other",
    "unsampled",
]


def stage_of(frames: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first; py-spy's ``process N:"name"`` entries
    first). A busy-poll frame anywhere in the stack wins, and so does a spin in the ring's read loop."""
    poll, *others = STAGES
    innermost = frames[-1] if frames else ""
    if any(n in frame for frame in frames for n in poll[1]) or any(w in innermost for w in RING_WAIT_FRAMES):
        return poll[0]
    python = [f for f in frames if not f.startswith("process ")]
    if not python:
        return "unreadable_stack"
    if python[-1].startswith("Runner.run ("):
        return "event_loop_wait"
    for frame in reversed(python):
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


def tally_by_process(collapsed: str) -> dict[int, Counter[str]]:
    """Samples per stage of each process (its pid) from py-spy's ``--format raw`` output
    (``process N:"name";frame;... count`` lines)."""
    counts: dict[int, Counter[str]] = {}
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        pid = int(procs[-1].split()[1].split(":")[0]) if procs else 0
        stage = stage_of(frames)
        if stage != "busy_poll" and is_idle(frames):  # a spin's ``SpinCondition.wait`` is not blocked
            stage = "idle_loop"
        counts.setdefault(pid, Counter())[stage] += int(n)
    return counts


def tally(collapsed: str) -> Counter[str]:
    """Samples per stage over every process."""
    return sum(tally_by_process(collapsed).values(), Counter())


def cpu_by_stage(samples: dict[int, Counter[str]], cpu_s: dict[int, float]) -> dict[str, float]:
    """Each process's CPU seconds (from the kernel, exact) split over stages in proportion to its samples
    that used CPU. py-spy on a loaded 2-core machine drops samples unevenly (a round may get a tenth of
    another's), so sample counts alone are not times; their proportions within a process are. CPU of a
    process without such samples cannot be placed: it goes to ``unsampled`` (overhead, so it is not lost)."""
    out: Counter[str] = Counter()
    for pid, seconds in cpu_s.items():
        busy = {stage: n for stage, n in samples.get(pid, Counter()).items() if stage not in NO_CPU_STAGES}
        total = sum(busy.values())
        if not total:
            out["unsampled"] += seconds
        for stage, n in busy.items():
            out[stage] += seconds * n / total
    return dict(out)


def process_cpu_seconds(root: int) -> dict[int, float]:
    """User + system CPU seconds so far of ``root`` and every process under it, by pid."""
    import psutil

    top = psutil.Process(root)
    out = {}
    for proc in [top, *top.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[proc.pid] = times.user + times.system
    return out


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
    audit: list[dict] = []  # per round and process: kernel CPU seconds and py-spy's samples
    with httpx.Client(base_url=base, timeout=600) as client:
        for context in contexts:
            check(client.post("/sessions", json={"id": f"{SESSION}-{context}"}), 200, 201)
            sizes[context] = grow(client, f"{SESSION}-{context}", context, tokens)
        for r in range(rounds):
            for context in contexts:
                session = f"{SESSION}-{context}"
                turns(client, model, session, 3, tokens, rng)  # warm-up at this size
                # the CPU window is the sampling window: the worker spins for a while after each step
                # (vLLM's busy loop), so both start after it settled and end after the last one settled
                time.sleep(SETTLE_S)
                before = process_cpu_seconds(pid)
                sampler = Sampler(pid, rate, out_dir / f"stacks-{context}-{r}.txt")
                latencies[context] += turns(client, model, session, k, tokens, rng)
                time.sleep(SETTLE_S)
                samples = tally_by_process(sampler.stop())
                after = process_cpu_seconds(pid)
                cpu = {p: after[p] - before.get(p, 0.0) for p in after}
                stages = cpu_by_stage(samples, cpu)
                audit += [
                    {"context_tokens": context, "round": r, "pid": p, "cpu_s": f"{seconds:.4f}",
                     "samples_using_cpu": sum(n for st, n in samples.get(p, {}).items() if st not in NO_CPU_STAGES),
                     "samples": sum(samples.get(p, {}).values())}
                    for p, seconds in sorted(cpu.items())
                ]  # fmt: skip
                per_round[context].append({stage: seconds / k for stage, seconds in stages.items()})
                overhead = sum(per_round[context][-1].get(s, 0.0) for s in OVERHEAD_STAGES)
                print(f"round {r} context {context}: overhead {overhead * 1000:.1f} ms/request", flush=True)
        for context in contexts:
            client.delete(f"/sessions/{SESSION}-{context}")
    write_rows(
        audit, out_dir / "rounds.csv", ("context_tokens", "round", "pid", "cpu_s", "samples_using_cpu", "samples")
    )
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
    waits = [s for s in WAIT_STAGES if s not in NO_CPU_STAGES]
    stages = [s for s, _ in STAGES[1:]] + ["other", *waits]
    head = "| stage (CPU ms per request) | " + " | ".join(f"{r.context} tok" for r in results)
    lines = [head + f" | {results[-1].context}/{results[0].context} |", "|---" * (len(results) + 2) + "|"]

    def row(name: str, values: list[float]) -> str:
        ratio = f"{values[-1] / values[0]:.2f}x" if values[0] > 0 else "-"
        return f"| {name} | " + " | ".join(f"{v * 1000:.2f}" for v in values) + f" | {ratio} |"

    for stage in stages:
        lines.append(row(stage, [r.seconds_per_request.get(stage, 0.0) for r in results]))
    lines.append(row("**overhead (all but forward and waits)**", [r.overhead_s() for r in results]))
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
