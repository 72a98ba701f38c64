"""A/B driver: stock vLLM without and with prefix caching, then vllm-stateful, back to back.

Usage::

    python benchmarks/compare.py [--config configs/bench_chat.yaml] [--model-path DIR | --demo-size small]
        [--topics N] [--turns 12] [--max-tokens K] [--out-dir benchmarks/results/chat] [--only LABEL ...]

For each run of the config, in order, it starts one server on a free loopback port, waits for
``GET /health`` and ``GET /v1/models``, sends one warm-up request (a prompt sharing no prefix with the
workload), runs ``stateful_benchmark.run_benchmark`` with identical prompts and settings, and stops
the server (its whole process group) before the next run. Output in ``--out-dir``: ``<label>.csv``
per run, ``combined.csv``, ``summary.md`` (last-turn table, ratios baseline/stateful), the PNGs of
``report.PLOT_FILES`` and ``server-<label>.log``. A failed run is reported and skipped; the exit
status is then 1. ``--report-only`` re-renders the report from an existing ``combined.csv``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report
import stateful_benchmark
from harness import REPO_ROOT
from harness.config import load_config, merge
from harness.machine import detect_device, machine_info, machine_line, model_dir, with_dtype
from harness.results import command_line, record_command, write_text
from harness.servers import ManagedServer, free_port, serve_argv

DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench_chat.yaml"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "chat"
WARMUP_PROMPT = "Warm-up: count from one to five."


@dataclass(frozen=True)
class RunSpec:
    """One server configuration to benchmark. ``kind``: ``vllm`` or ``stateful``."""

    label: str
    kind: str
    provider: str
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("vllm", "stateful"):
            raise ValueError(f"run {self.label!r}: kind must be vllm or stateful, got {self.kind!r}")
        if self.provider not in ("stateful", "stateless"):
            raise ValueError(f"run {self.label!r}: provider must be stateful or stateless")
        if (self.provider == "stateful") != report.is_session_provider(self.label):
            raise ValueError(f"run {self.label!r}: session runs, and only they, need a 'stateful' label")


def server_command(
    spec: RunSpec, model_path: str, served_name: str, host: str, port: int, common_args: Sequence[str]
) -> list[str]:
    """The argv that starts ``spec``'s server with this interpreter."""
    return serve_argv(spec.kind, model_path, served_name, port, [*common_args, *spec.args], host)


def warm_up(base_url: str, model: str) -> None:
    """One short request that shares no prefix with the workload (no system prompt)."""
    client = stateful_benchmark.make_client(base_url)
    client.chat.completions.create(
        model=model, max_tokens=4, temperature=0.0, messages=[{"role": "user", "content": WARMUP_PROMPT}]
    )


def run_one(spec: RunSpec, cfg: dict[str, Any], model_path: str, out_dir: Path) -> list[report.Row]:
    """Start ``spec``'s server, warm it up, benchmark it, stop it; returns the rows (also written to
    ``out_dir/<label>.csv``). Raises on any failure after stopping the server."""
    srv, wl = cfg["server"], cfg["workload"]
    host, name = srv["host"], cfg["model"]["served_model_name"]
    port = free_port(host)
    base_url = f"http://{host}:{port}/v1"
    common = [*srv["args"], *srv.get("extra_args", [])]
    if "--dtype" not in spec.args:
        common = with_dtype(common, cfg["model"]["path"] or cfg["model"]["demo_size"])
    argv = server_command(spec, model_path, name, host, port, common)
    env = {str(k): str(v) for k, v in (srv.get("env") or {}).items()}
    print(f"[{spec.label}] starting: {shlex.join(argv)}", flush=True)
    started = time.monotonic()
    with ManagedServer(argv, env, out_dir / f"server-{spec.label}.log", base_url) as server:
        server.wait_ready(float(srv["startup_timeout_s"]))
        print(f"[{spec.label}] ready in {time.monotonic() - started:.0f}s", flush=True)
        warm_up(base_url, name)
        rows = stateful_benchmark.run_benchmark(
            spec.provider,
            base_url,
            name,
            int(wl["topics"]),
            int(wl["turns"]),
            int(wl["max_tokens"]),
            model_path,
            label=spec.label,
            temperature=float(wl["temperature"]),
            progress=True,
        )
    report.write_csv(rows, out_dir / f"{spec.label}.csv")
    return rows


def write_report(rows: Sequence[report.Row], out_dir: Path, header: str) -> str:
    """Write ``combined.csv``, the PNGs and ``summary.md``; return the one-line summary."""
    report.write_csv(rows, out_dir / "combined.csv")
    summaries = report.summarize(rows)
    report.plot_all(rows, out_dir)
    line = report.one_line_summary(summaries)
    body = [header, "", report.format_markdown(summaries), "", line, ""]
    body += [f"![{p}]({p})" for p in report.PLOT_FILES]
    write_text("\n".join(body) + "\n", out_dir / "summary.md")
    return line


def previous_header(out_dir: Path) -> str:
    """The run description at the top of an existing ``summary.md`` (text before its table)."""
    path = out_dir / "summary.md"
    if not path.exists():
        return "# Chat benchmark"
    lines = path.read_text().splitlines()
    head = lines[: next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))]
    return "\n".join(head).rstrip()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--model-path", default=None, help="model dir (default: the config's demo model)")
    p.add_argument("--demo-size", choices=("tiny", "small"), default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--topics", type=int, default=None)
    p.add_argument("--turns", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--server-args", default="", help='extra flags for every server, e.g. "--dtype float16"')
    p.add_argument("--startup-timeout", type=float, default=None)
    p.add_argument("--only", action="append", default=None, metavar="LABEL", help="run only these labels")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT))
    p.add_argument("--report-only", action="store_true", help="re-render from OUT_DIR/combined.csv")
    return p.parse_args(argv)


def apply_overrides(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The config with the command line's explicit values layered on top."""
    over: dict[str, Any] = {"workload": {}, "model": {}, "server": {}}
    for key in ("topics", "turns", "max_tokens"):
        if getattr(args, key) is not None:
            over["workload"][key] = getattr(args, key)
    if args.model_path:
        over["model"]["path"] = args.model_path
    if args.demo_size:
        over["model"]["demo_size"] = args.demo_size
    if args.served_model_name:
        over["model"]["served_model_name"] = args.served_model_name
    if args.startup_timeout is not None:
        over["server"]["startup_timeout_s"] = args.startup_timeout
    if args.server_args:
        over["server"]["extra_args"] = [*cfg["server"].get("extra_args", []), *shlex.split(args.server_args)]
    return merge(cfg, over)


def main(argv: Sequence[str] | None = None) -> int:
    record_command(__file__, argv)
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.report_only:
        print(write_report(report.read_csv(out_dir / "combined.csv"), out_dir, previous_header(out_dir)))
        return 0
    device = detect_device() if args.device == "auto" else args.device
    cfg = apply_overrides(load_config(args.config, device), args)
    specs = [
        RunSpec(r["label"], r["kind"], r["provider"], tuple(map(str, r.get("args", []))))
        for r in cfg["runs"]
        if not args.only or r["label"] in args.only
    ]
    if not specs:
        raise SystemExit(f"no runs selected (--only {args.only})")
    model_path = str(model_dir(cfg["model"]["path"] or cfg["model"]["demo_size"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    wl = cfg["workload"]
    rows: list[report.Row] = []
    failed: list[str] = []
    for spec in specs:
        try:
            rows += run_one(spec, cfg, model_path, out_dir)
        except Exception:  # noqa: BLE001 - one broken server must not lose the other runs
            traceback.print_exc()
            failed.append(spec.label)
    header = (
        f"# Chat benchmark ({_dt.datetime.now().isoformat(timespec='seconds')})\n\n"
        f"model `{model_path}`, device {device}, {wl['topics']} topics x {wl['turns']} turns, "
        f"max_tokens {wl['max_tokens']}, temperature {wl['temperature']}, "
        f"server flags `{shlex.join(map(str, [*cfg['server']['args'], *cfg['server'].get('extra_args', [])]))}`\n\n"
        f"command: `{command_line()}`\n\n{machine_line(machine_info())}"
        + (f"\n\nFAILED runs (see server-<label>.log): {', '.join(failed)}" if failed else "")
    )
    if rows:
        print(write_report(rows, out_dir, header))
        print(f"results in {out_dir}")
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
