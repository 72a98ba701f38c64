"""Loaded at interpreter start by every process of a benchmark server started with
``harness.machine.avx2_env()`` (this folder is put first on PYTHONPATH): makes an AVX-512 CPU look
like an AVX2-only one to vLLM and to vllm-stateful, so the AVX2 code paths can be measured here.

- torch's ISA probes that vLLM consults (``torch.cpu._is_avx512_supported`` and the bf16/VNNI/AMX
  ones) answer False, so vLLM loads its ``_C_AVX2`` kernels and picks its AVX2 attention path;
- ``vllm_stateful.cpu_dtype.cpu_flags`` drops the avx512*/amx* flags, so ``serve`` chooses its dtype
  as it would on an AVX2 machine;
- ATen's and oneDNN's own dispatch are capped by ``ATEN_CPU_CAPABILITY=avx2`` and
  ``ONEDNN_MAX_CPU_ISA=AVX2`` (set by ``avx2_env``, read by those libraries themselves).

An emulation, not the machine: caches, clocks and memory bandwidth stay those of this CPU. Only for
benchmarks; the product never loads it.
"""

import os

if os.environ.get("BENCH_EMULATE_AVX2") == "1":
    try:
        import torch

        for probe in (
            "_is_avx512_supported",
            "_is_avx512_bf16_supported",
            "_is_avx512_vnni_supported",
            "_is_amx_tile_supported",
            "_is_amx_fp16_supported",
        ):
            if hasattr(torch.cpu, probe):
                setattr(torch.cpu, probe, lambda: False)
    except ImportError:
        pass
    try:
        from vllm_stateful import cpu_dtype

        _real_flags = cpu_dtype.cpu_flags

        def _avx2_flags(cpuinfo=None):
            return {f for f in _real_flags(cpuinfo) if not f.startswith(("avx512", "amx"))}

        cpu_dtype.cpu_flags = _avx2_flags
    except ImportError:
        pass
