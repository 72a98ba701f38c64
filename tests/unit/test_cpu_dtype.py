"""The CPU serving dtype follows the processor's native bfloat16 support."""

import pytest

from vllm_stateful.cli import serve_argv
from vllm_stateful.cpu_dtype import choose_cpu_dtype, cpu_flags

AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2"  # e.g. AMD EPYC (Zen 2/3)
AVX512 = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"  # e.g. Intel Cascade Lake
AVX512_BF16 = AVX512 + " avx512_bf16"  # e.g. AMD Zen 4, Intel Cooper Lake
AMX = AVX512 + " amx_tile amx_int8 amx_bf16"  # e.g. Intel Sapphire Rapids


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [("", "float32"), (AVX2, "float32"), (AVX512, "float32"), (AVX512_BF16, "bfloat16"), (AMX, "bfloat16")],
)
def test_bfloat16_only_with_native_support(flags, dtype):
    chosen, reason = choose_cpu_dtype(set(flags.split()))
    assert chosen == dtype and reason


def test_flags_are_read_from_cpuinfo():
    info = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags("no flags here") == set()


def test_serve_picks_the_dtype_unless_given(monkeypatch):
    monkeypatch.setattr("vllm_stateful.cli.is_cpu_build", lambda: True)
    monkeypatch.setattr("vllm_stateful.cli.cpu_flags", lambda: set(AVX2.split()))
    argv = serve_argv(["/models/m"])
    assert argv[argv.index("--dtype") + 1] == "float32"
    monkeypatch.setattr("vllm_stateful.cli.cpu_flags", lambda: set(AVX512_BF16.split()))
    argv = serve_argv(["/models/m"])
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    argv = serve_argv(["/models/m", "--dtype", "float16"])  # an explicit --dtype wins
    assert argv.count("--dtype") == 1 and argv[argv.index("--dtype") + 1] == "float16"
