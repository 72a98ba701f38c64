"""Loaded at interpreter start by every process of a benchmark server started with
``harness.machine.avx2_env()`` (this folder is put first on PYTHONPATH): makes an AVX-512 CPU look
like an AVX2-only one (AVX2, FMA, F16C; no AVX-512, no VNNI, no AMX) to vLLM and to vllm-stateful,
so the AVX2 code paths can be measured here.

- torch's ISA probes (``torch.cpu._is_avx512_supported``, ``_is_avx512_bf16_supported``,
  ``_is_vnni_supported``, ``_is_amx_tile_supported``, ``_is_amx_fp16_supported``) answer False and
  ``torch.cpu.get_capabilities()`` reports the avx512*/amx*/vnni entries False, so vLLM loads its
  ``_C_AVX2`` kernels and takes its AVX2 attention and GEMM paths;
- ``vllm_stateful.cpu_dtype.cpu_flags`` drops the avx512*/amx* flags, so ``serve`` chooses its dtype
  as it would on an AVX2 machine;
- ATen's, oneDNN's and MKL's own dispatch are capped by ``ATEN_CPU_CAPABILITY=avx2``,
  ``ONEDNN_MAX_CPU_ISA=AVX2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (set by ``avx2_env``).

An emulation, not the machine: caches, clocks and memory bandwidth stay those of this CPU (measured:
bfloat16 prefill of the ``small`` model runs ~2x faster here than on a real AVX2-only EPYC). Only for
benchmarks; the product never loads it. A ``sitecustomize`` this one shadows is still run.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hidden(name: str) -> bool:
    return name.startswith(("avx512", "amx")) or "vnni" in name


def _emulate_avx2() -> None:
    try:
        import torch

        for probe in (
            "_is_avx512_supported",
            "_is_avx512_bf16_supported",
            "_is_vnni_supported",
            "_is_amx_tile_supported",
            "_is_amx_fp16_supported",
        ):
            if hasattr(torch.cpu, probe):
                setattr(torch.cpu, probe, lambda: False)
        real_capabilities = torch.cpu.get_capabilities
        torch.cpu.get_capabilities = lambda: {
            k: (False if _hidden(k) and v is True else v) for k, v in real_capabilities().items()
        }
    except ImportError:
        pass
    try:
        from vllm_stateful import cpu_dtype

        real_flags = cpu_dtype.cpu_flags
        cpu_dtype.cpu_flags = lambda cpuinfo=None: {f for f in real_flags(cpuinfo) if not _hidden(f)}
    except ImportError:
        pass


def _run_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_run_shadowed_sitecustomize()
if os.environ.get("BENCH_EMULATE_AVX2") == "1":
    _emulate_avx2()
