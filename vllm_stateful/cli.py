"""``vllm-stateful``: serve vLLM with stateful sessions on, or build a demo model.

``vllm-stateful serve [MODEL] [vllm serve flags] [plugin flags]`` is exactly
``vllm serve`` with the plugin switched on (scheduler class, endpoint plugin
allow-list) and CPU defaults that matter; any vLLM flag given explicitly wins.
With no MODEL it serves the embedded tiny demo model, built on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Sequence

from vllm_stateful import SCHEDULER_CLS
from vllm_stateful.config import ADMISSION_MODES, RESTORE_MODES
from vllm_stateful.cpu_dtype import choose_cpu_dtype, cpu_flags, is_cpu_build

PLUGIN_NAME = "stateful"

# Plugin flags -> keys of --additional-config '{"stateful": {...}}'.
PLUGIN_FLAGS = {
    "--cell-budget": ("cell_budget", int, "KV token slots all sessions may pin (default: 90%% of the KV cache)"),
    "--session-quota": ("session_quota", int, "most tokens one session may hold (default: max_model_len)"),
    "--admission": (
        "admission",
        str,
        "over budget: reject = 429 + Retry-After (default); offload = spill idle sessions' KV",
    ),
    "--state-dir": (
        "state_dir",
        str,
        "durable session state (SQLite); default: under ~/.cache/vllm-stateful; 'off' disables",
    ),
    "--shared-state-root": (
        "shared_state_root",
        str,
        "replicas: a shared directory holding every replica's --state-dir; sessions are taken over between them",
    ),
    "--session-header": (
        "session_header",
        str,
        "replicas: also read the session id from this header (the one the router hashes, e.g. X-Session-ID)",
    ),
    "--advertise-url": ("advertise_url", str, "replicas: where the others reach this one (default http://HOST:PORT)"),
    "--restore": ("restore", str, "restored sessions' KV: lazy = re-prefilled on first use (default); eager"),
    "--default-ttl-s": ("default_ttl_s", float, "idle seconds before a session expires; 0 = never (default 3600)"),
    "--max-ingest-queue-tokens": ("max_ingest_queue_tokens", int, "per-session append queue bound (default 8192)"),
    "--max-sessions": ("max_sessions", int, "live sessions in all (default 4096)"),
    "--max-sessions-per-tenant": ("max_sessions_per_tenant", int, "live sessions per tenant (default: --max-sessions)"),
    "--max-request-body-bytes": ("max_request_body_bytes", int, "largest session request body (default 4 MiB)"),
    "--tenant-header": ("tenant_header", str, "header naming the tenant, set by a trusted gateway (default: none)"),
}

# vLLM flags whose values sessions cannot run with (see engine/support.py): the sessions live
# in one API server process, whatever the number of data-parallel ranks.
SINGLE_ONLY_FLAGS = ("--api-server-count", "-asc")
DP_FLAGS = ("--data-parallel-size", "-dp")


def plugin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-stateful serve",
        usage="vllm-stateful serve [MODEL] [vllm serve flags] [plugin options]",
        add_help=False,
        description="Plugin options (merged into --additional-config '{\"stateful\": {...}}'):",
    )
    for flag, (_, typ, help_text) in PLUGIN_FLAGS.items():
        choices = {"--admission": ADMISSION_MODES, "--restore": RESTORE_MODES}.get(flag)
        parser.add_argument(flag, type=typ, help=help_text, choices=choices)
    return parser


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def refuse_unsupported(args: Sequence[str]) -> None:
    """Fail fast, before vLLM starts, on flags sessions do not support yet."""
    for flag in SINGLE_ONLY_FLAGS:
        value = _flag_value(args, flag)
        if value is not None and value.strip() not in ("1", ""):
            raise SystemExit(
                f"vllm-stateful: {flag} {value} is not supported: sessions live in one API server process "
                "(--api-server-count 1), which serves every data-parallel rank"
            )


def data_parallel_size(args: Sequence[str]) -> int:
    for flag in DP_FLAGS:
        value = _flag_value(args, flag)
        if value is not None:
            try:
                return max(1, int(value))
            except ValueError:
                raise SystemExit(f"vllm-stateful: {flag} {value!r} is not a number") from None
    return 1


def usable_cores() -> list[int]:
    """The cores this process may run on (a container's cpuset, ``taskset``), in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _core_list(ids: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def cpu_binding(dp: int, cores: Sequence[int], given: str | None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``dp`` ranks: each rank needs its own core list
    (``0|1``; one list for all makes vLLM fail at startup). Equal shares of ``cores`` in order."""
    if given is not None:
        if dp > 1 and given not in ("auto", "nobind") and len(given.split("|")) != dp:
            raise SystemExit(
                f"vllm-stateful: VLLM_CPU_OMP_THREADS_BIND={given!r} names {len(given.split('|'))} core list(s) "
                f"for {dp} data-parallel ranks; give one per rank separated by '|', e.g. '0|1', or unset it"
            )
        return given
    if dp > len(cores):
        raise SystemExit(
            f"vllm-stateful: --data-parallel-size {dp} needs at least {dp} CPU cores; this process may use {len(cores)}"
        )
    share = len(cores) // dp
    return "|".join(_core_list(cores[r * share : (r + 1) * share]) for r in range(dp))


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def serve_argv(argv: Sequence[str]) -> list[str]:
    """The ``vllm serve`` argv for ``vllm-stateful serve argv`` (environment set as a side effect)."""
    argv = list(argv)
    demo_dtype = None
    if argv and not argv[0].startswith("-"):
        model, rest = argv[0], argv[1:]
    else:
        from vllm_stateful.demo_model import SHAPES, ensure_demo_model

        model, rest = str(ensure_demo_model("tiny")), argv
        demo_dtype = SHAPES["tiny"].dtype  # served in the dtype it is written in
        if not _has_flag(rest, "--served-model-name"):
            rest = [*rest, "--served-model-name", "qwen2-tiny-demo"]
    refuse_unsupported(rest)
    dp = data_parallel_size(rest)
    plugin_args, rest = plugin_parser().parse_known_args(rest)
    settings = {key: getattr(plugin_args, flag[2:].replace("-", "_")) for flag, (key, _, _) in PLUGIN_FLAGS.items()}
    settings = {k: v for k, v in settings.items() if v is not None}
    rest = _merge_additional_config(rest, settings)

    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    if PLUGIN_NAME not in plugins:
        plugins.append(PLUGIN_NAME)
    os.environ["VLLM_PLUGINS"] = ",".join(plugins)

    defaults: list[tuple[str, list[str]]] = [("--scheduler-cls", ["--scheduler-cls", SCHEDULER_CLS])]
    if dp > 1:  # vLLM starts one API server per rank by default; sessions need exactly one
        defaults.append(("--api-server-count", ["--api-server-count", "1"]))
    if is_cpu_build():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        binding = cpu_binding(dp, usable_cores(), os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        if demo_dtype is not None:
            dtype, reason = demo_dtype, "the demo model's own dtype"
        else:
            dtype, reason = choose_cpu_dtype(cpu_flags())
        if not _has_flag(rest, "--dtype"):
            print(f"vllm-stateful: serving in {dtype} ({reason}); --dtype overrides", file=sys.stderr)
        defaults += [
            ("--dtype", ["--dtype", dtype]),
            ("--block-size", ["--block-size", "32"]),
            ("--enforce-eager", ["--enforce-eager"]),
            ("--max-model-len", ["--max-model-len", "8192"]),
        ]
    for flag, values in defaults:
        if not _has_flag(rest, flag) and not (flag == "--enforce-eager" and _has_flag(rest, "--no-enforce-eager")):
            rest += values
    return ["vllm", "serve", model, *rest]


def _merge_additional_config(args: list[str], settings: dict) -> list[str]:
    if not settings:
        return args
    out, merged = [], False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--additional-config" or a.startswith("--additional-config="):
            raw = a.split("=", 1)[1] if "=" in a else args[i + 1]
            i += 1 if "=" in a else 2
            cfg = json.loads(raw)
            cfg.setdefault("stateful", {}).update(settings)
            out += ["--additional-config", json.dumps(cfg)]
            merged = True
            continue
        out.append(a)
        i += 1
    if not merged:
        out += ["--additional-config", json.dumps({"stateful": settings})]
    return out


def announce_when_ready(argv: Sequence[str], timeout_s: float = 1800.0) -> threading.Thread:
    """Print one line once the server answers ``/health``: where it is, what to try, how to stop it."""
    host = _flag_value(argv, "--host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    port = _flag_value(argv, "--port") or "8000"
    base = f"http://{host}:{port}"

    def watch() -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        print(
                            f"\n=== vllm-stateful is ready: {base}/v1 (OpenAI API with sessions). Try: "
                            f"python examples/chat_session.py --base-url {base}/v1  |  stop: Ctrl-C ===\n",
                            file=sys.stderr,
                            flush=True,
                        )
                        return
            except Exception:
                pass
            time.sleep(1.0)

    thread = threading.Thread(target=watch, name="vllm-stateful-ready", daemon=True)
    thread.start()
    return thread


def _run_vllm(argv: list[str]) -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = argv
    vllm_main()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: vllm-stateful {serve,demo-model} ...\n\n"
            "  serve [MODEL] [vllm serve flags] [plugin flags]   vLLM's OpenAI server with sessions on\n"
            "  demo-model [--size tiny|small] PATH               write a random-weight Qwen2 model"
        )
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo-model":
        parser = argparse.ArgumentParser(prog="vllm-stateful demo-model")
        parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("path")
        ns = parser.parse_args(rest)
        from vllm_stateful.demo_model import build_demo_model

        print(build_demo_model(ns.path, ns.size, ns.seed))
        return 0
    if cmd == "serve":
        if any(a in ("-h", "--help") or a.startswith("--help=") for a in rest):
            plugin_parser().print_help()
            print(
                f"\nAlways set: --scheduler-cls {SCHEDULER_CLS}, VLLM_PLUGINS+={PLUGIN_NAME}.\n"
                "With no MODEL: the embedded tiny demo model (Qwen2 shape, random weights, built locally on first "
                "use), served as qwen2-tiny-demo.\n"
                "CPU defaults (overridable): --dtype float32, or bfloat16 where the CPU has native bf16 "
                "(avx512_bf16/amx_bf16); --block-size 32 --enforce-eager --max-model-len 8192, "
                "VLLM_CPU_KVCACHE_SPACE=4 (per rank), VLLM_CPU_OMP_THREADS_BIND=all cores (with "
                "--data-parallel-size N: an equal share per rank, e.g. 0|1).\n\nvLLM options (vLLM's "
                "own text below: its MODEL default does not apply here):\n"
            )
            sys.stdout.flush()
            return _run_vllm(["vllm", "serve", *rest])
        argv = serve_argv(rest)
        announce_when_ready(argv)
        return _run_vllm(argv)
    print(f"vllm-stateful: unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
