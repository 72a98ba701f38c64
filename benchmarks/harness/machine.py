"""The machine a figure was measured on, and the serving settings that follow from it.

Every summary records ``machine_line(machine_info())``: device, CPU model, core count and the
vector/matrix ISA flags (bfloat16 speed differs ~5x with and without native support), so a figure
is never read without its machine.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ISA_PREFIXES = ("sse4", "avx", "amx", "fma", "f16c", "asimd", "sve", "neon", "bf16", "vnni")
DEMO_SIZES = ("tiny", "small")


def detect_device() -> str:
    """``gpu`` when torch sees CUDA, else ``cpu``."""
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def parse_cpuinfo(text: str) -> tuple[str | None, list[str]]:
    """(CPU model, sorted vector/matrix ISA flags) from ``/proc/cpuinfo`` text (x86 or Arm)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if model is None and key in ("model name", "Model", "Hardware", "cpu model"):
            model = value or None
        elif key in ("flags", "Features") and not flags:
            flags = {f for f in value.split() if f.startswith(ISA_PREFIXES)}
    return model, sorted(flags)


def machine_info() -> dict[str, Any]:
    """Device, CPU model and ISA flags, cores, architecture, GPU name if any."""
    try:
        model, isa = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, isa = None, []
    info: dict[str, Any] = {"device": detect_device(), "cpu_model": model or platform.processor() or platform.machine()}
    info.update(isa_flags=isa, cores=_usable_core_count(), arch=platform.machine(), gpu=None)
    if info["device"] == "gpu":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _usable_core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_line(info: dict) -> str:
    """One line for a summary: ``machine: cpu, CPU <model> x<cores>; ISA <flags>``."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    isa = " ".join(info.get("isa_flags") or []) or "n/a"
    return (
        f"machine: {info.get('device')}, CPU {info.get('cpu_model') or 'unknown'} x{info.get('cores')}{gpu}; ISA {isa}"
    )


def model_dir(model: str) -> Path:
    """A demo size (``tiny``/``small``: built locally on first use) or an existing model directory."""
    if model in DEMO_SIZES:
        from vllm_stateful.demo_model import ensure_demo_model

        return Path(ensure_demo_model(model))
    path = Path(model)
    if not path.is_dir():
        raise SystemExit(f"model {model!r} is neither a demo size ({'|'.join(DEMO_SIZES)}) nor a directory")
    return path


@functools.lru_cache(maxsize=4)
def _corpus(model_path: str) -> tuple[int, ...]:
    from vllm_stateful.demo_model import corpus_token_ids

    return tuple(corpus_token_ids(model_path))


def corpus_ids(model_path: str | Path, n: int, offset: int = 0) -> list[int]:
    """``n`` token ids of ordinary text (the demo corpus, repeated), starting ``offset`` tokens in.
    Random ids decode to broken UTF-8, which makes vLLM's detokenizer prime itself over the whole
    prompt: a real but unrepresentative O(context) cost."""
    return wrapped_slice(_corpus(str(model_path)), offset, n)


def wrapped_slice(ids: Sequence[int], start: int, n: int) -> list[int]:
    """``n`` ids of ``ids`` read as an endless loop, from position ``start`` (taken modulo its length)."""
    start %= len(ids)
    return (list(ids) * ((start + n) // len(ids) + 1))[start : start + n]


def serving_dtype(model: str) -> str:
    """The ``--dtype`` both servers of an A/B get: a demo model's own, else by the CPU's bf16 support
    (``vllm_stateful.cpu_dtype``), ``auto`` on a GPU."""
    if model in DEMO_SIZES:
        from vllm_stateful.demo_model import serving_dtype as demo_dtype

        return demo_dtype(model)
    if detect_device() != "cpu":
        return "auto"
    from vllm_stateful.cpu_dtype import choose_cpu_dtype, cpu_flags

    return choose_cpu_dtype(cpu_flags())[0]


def with_dtype(args: list[str], model: str) -> list[str]:
    """Server flags with ``--dtype serving_dtype(model)`` added unless they name one: stock vLLM
    (``auto``: the checkpoint's dtype) and ``vllm-stateful serve`` (the CPU's choice) would otherwise
    serve one model in two dtypes."""
    given = any(a == "--dtype" or a.startswith("--dtype=") for a in args)
    return list(args) if given else [*args, "--dtype", serving_dtype(model)]


def cpu_env(kv_space_gib: int = 4, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """The same KV space and thread binding (every core this process may use) for every server of an
    A/B on a CPU build; empty on a GPU. ``overrides`` (a config's ``cpu_env``) replace the defaults.
    These values win over the shell's, so a run's conditions are the command's, not the terminal's."""
    if detect_device() != "cpu":
        return {}
    from vllm_stateful.cli import cpu_binding, usable_cores

    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib),
        "VLLM_CPU_OMP_THREADS_BIND": cpu_binding(1, usable_cores(), None),
    }
    env.update({k: str(v) for k, v in (overrides or {}).items()})
    return env


def avx2_env() -> dict[str, str]:
    """Environment for a server that should run as on an AVX2-only CPU (``harness/avx2``)."""
    here = str(Path(__file__).resolve().parent / "avx2")
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    caps = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    return {"BENCH_EMULATE_AVX2": "1", "PYTHONPATH": path, **caps}
