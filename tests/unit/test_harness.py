"""Unit tests for the pure parts of the benchmark harness (``benchmarks/harness``): the machine line
from ``/proc/cpuinfo`` text, the CSV round trip, the config helpers (merge, override, select), the
recorded command, the CPU environment and the AVX2 emulation."""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass

import pytest
from harness.config import add_typed_options, int_list, merge, override, select
from harness.machine import avx2_env, corpus_ids, machine_line, parse_cpuinfo
from harness.results import columns_of, command_line, read_rows, write_rows

pytestmark = pytest.mark.unit

X86 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f amx_bf16 ht\n\nprocessor\t: 1\nmodel name\t: other\n"  # noqa: E501
ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 crc32\nCPU part\t: 0xd40\n"


def test_parse_cpuinfo_and_machine_line():
    assert parse_cpuinfo(X86) == ("Intel(R) Xeon(R) Platinum 8480+", ["amx_bf16", "avx", "avx2", "avx512f", "fma", "sse4_2"])  # fmt: skip  # noqa: E501
    assert parse_cpuinfo(ARM) == (None, ["asimd", "bf16", "sve"])
    line = machine_line({"device": "cpu", "cpu_model": "Xeon", "cores": 2, "isa_flags": ["avx2"], "gpu": None})
    assert line == "machine: cpu, CPU Xeon x2; ISA avx2"
    assert "GPU H200" in machine_line({"device": "gpu", "gpu": "H200", "isa_flags": []})
    assert machine_line({"device": "cpu", "cores": 1}) == "machine: cpu, CPU unknown x1; ISA n/a"


@dataclass
class Row:
    name: str
    seconds: float
    note: str | None = None


def test_write_rows_round_trip(tmp_path):
    rows = [Row("a", 0.1 + 0.2), Row("b", 2.0, "x")]
    path = write_rows(rows, tmp_path / "deep" / "r.csv")  # parent folders are created
    with path.open() as f:
        recs = list(csv.DictReader(f))
    assert list(recs[0]) == list(columns_of(Row)) == ["name", "seconds", "note"]
    assert [float(r["seconds"]) for r in recs] == [0.1 + 0.2, 2.0]  # repr precision
    assert [r["note"] for r in recs] == ["", "x"]  # None is an empty cell
    dicts = [{"op": "q", "tokens": 3, "extra": 1}]
    with write_rows(dicts, tmp_path / "d.csv", ("tokens", "op")).open() as f:
        assert f.read().splitlines() == ["tokens,op", "3,q"]  # given column order; other keys dropped
    with write_rows([], tmp_path / "e.csv", columns_of(Row)).open() as f:
        assert f.read().splitlines() == ["name,seconds,note"]


def test_merge_is_deep_and_does_not_touch_its_inputs():
    base = {"a": 1, "server": {"args": [1], "env": {"X": "1"}}}
    out = merge(base, {"server": {"env": {"Y": "2"}, "args": [2]}, "b": 2})
    assert out == {"a": 1, "b": 2, "server": {"args": [2], "env": {"X": "1", "Y": "2"}}}
    assert base == {"a": 1, "server": {"args": [1], "env": {"X": "1"}}}


def test_override_takes_only_what_the_user_typed():
    ap = argparse.ArgumentParser()
    add_typed_options(ap, (("ticks", int), ("max_tokens", int), ("rate", float)))
    args = ap.parse_args(["--ticks", "5", "--max-tokens", "0"])
    cfg = {"ticks": 300, "max_tokens": 8, "rate": 2.0}
    assert override(cfg, args, ("ticks", "max_tokens", "rate")) == {"ticks": 5, "max_tokens": 0, "rate": 2.0}
    assert cfg["ticks"] == 300


def test_select_keeps_known_order_and_refuses_unknown_names():
    known = ("flash", "stateful-query", "vllm-prefix-cache")
    assert select(known, None) == list(known) and select(known, "") == list(known)
    assert select(known, "vllm-prefix-cache,flash") == ["flash", "vllm-prefix-cache"]
    assert select(known, ["stateful-query"]) == ["stateful-query"]
    with pytest.raises(SystemExit, match=r"unknown providers \['nope'\]"):
        select(known, "flash,nope")


@dataclass
class Typed:
    name: str
    turns: int
    seconds: float
    ttft_s: float | None
    ok: bool


def test_read_rows_is_the_inverse_of_write_rows(tmp_path):
    rows = [Typed("a", 3, 0.1 + 0.2, None, True), Typed("b", 0, 2.5, 0.125, False)]
    path = write_rows(rows, tmp_path / "t.csv")
    assert read_rows(path, Typed) == rows  # int/float/bool by annotation, None from an empty cell
    (tmp_path / "bad.csv").write_text("name,seconds\na,1\n")
    with pytest.raises(ValueError, match="header"):
        read_rows(tmp_path / "bad.csv", Typed)


def test_command_line_is_what_a_user_types(monkeypatch):
    argv = ["/repo/benchmarks/streaming_benchmark.py", "--providers", "a,b", "--server-args", "--x 1"]
    assert command_line(argv) == "python benchmarks/streaming_benchmark.py --providers a,b --server-args '--x 1'"
    monkeypatch.setattr("sys.argv", ["/elsewhere/tool.py"])
    assert command_line() == "python /elsewhere/tool.py"


def test_int_list_and_corpus_ids(monkeypatch):
    assert int_list("1000, 3000,") == [1000, 3000]
    import harness.machine as machine

    monkeypatch.setattr(machine, "_corpus", lambda path: (1, 2, 3, 4, 5))
    assert corpus_ids("m", 7) == [1, 2, 3, 4, 5, 1, 2]  # repeated past the end
    assert corpus_ids("m", 4, offset=8) == [4, 5, 1, 2]  # offset wraps


def test_cpu_env_binds_the_usable_cores_and_takes_overrides(monkeypatch):
    import harness.machine as machine

    import vllm_stateful.cli as cli

    monkeypatch.setattr(machine, "detect_device", lambda: "cpu")
    monkeypatch.setattr(cli, "usable_cores", lambda: [2, 3, 5])  # a cpuset, not 0..N-1
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the shell's value does not leak into the run
    assert machine.cpu_env() == {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "2-3,5"}
    env = machine.cpu_env(overrides={"VLLM_CPU_KVCACHE_SPACE": 8})
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_OMP_THREADS_BIND": "2-3,5"}
    monkeypatch.setattr(machine, "detect_device", lambda: "gpu")
    assert machine.cpu_env() == {}


def test_avx2_emulation_hides_avx512_from_torch_and_the_dtype_choice():
    """A child process started with ``avx2_env()`` sees no AVX-512 and picks float32 (the flags of an
    AVX2-only CPU), whatever this machine has."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, torch; from vllm_stateful.cpu_dtype import choose_cpu_dtype, cpu_flags; "
        "f, c, cpu = cpu_flags(), torch.cpu.get_capabilities(), torch.cpu; print(json.dumps(["
        "cpu._is_avx512_supported(), cpu._is_avx512_bf16_supported(), cpu._is_vnni_supported(), "
        "cpu._is_amx_tile_supported(), c['avx512_f'], c['avx512_vnni'], any(x.startswith('avx512') for x in f), "
        "torch.backends.cpu.get_cpu_capability(), choose_cpu_dtype(f)[0]]))"
    )
    env = {**os.environ, **avx2_env()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    *hidden, capability, dtype = json.loads(out.stdout.splitlines()[-1])
    assert hidden == [False] * 7 and dtype == "float32"
    import torch

    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # an x86 host: ATen is capped too
        assert capability == "AVX2"


def test_query_floor_summary_is_the_median_per_context_over_the_smallest():
    from query_floor import _row, summarize

    rows = [_row("stock", ctx, r, lat, ttft) for ctx, r, lat, ttft in [
        (1000, 0, 1.0, 0.2), (1000, 1, 3.0, 0.4), (1000, 2, 2.0, 0.3),
        (8000, 0, 3.0, 1.0), (8000, 1, 2.5, 0.5), (8000, 2, 9.0, 0.7),
    ]]  # fmt: skip
    lines, ratios = summarize(rows, [1000, 8000])
    assert ratios["stock"]["p50"][1000] == pytest.approx({"latency_s": 2.0, "ttft_s": 0.3, "decode_s": 1.7})
    assert ratios["stock"]["p50"][8000]["latency_s"] == 3.0 and ratios["stock"]["p50"][8000]["ttft_s"] == 0.7
    assert ratios["stock"]["largest_over_smallest"] == pytest.approx(1.5)
    assert lines[-1] == "| stock | 8000 | 3.000 | 0.700 | 2.000 | 1.50 |"
