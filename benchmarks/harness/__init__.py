"""The benchmark harness: what every scenario in ``benchmarks/`` shares.

- ``servers``: start a stock vLLM or vllm-stateful server on a free port, wait until it answers,
  stop its process group; ``Lineup`` runs providers one server at a time.
- ``machine``: the device, CPU model and ISA flags every summary records; the serving dtype and
  CPU environment both servers of an A/B get.
- ``results``: CSV (dataclass rows or dicts), JSON, summary Markdown with the command and machine
  line, PNG figures, all under one output folder.
- ``http``: status checks, ``Retry-After``, streamed completions (sync and async) with TTFT, usage
  and the ``session`` object.
- ``config``: YAML defaults with a ``cpu``/``gpu`` section, command-line overrides, provider choice.

A scenario script (``streaming_benchmark.py``, ``compare.py``, ...) holds only its workload and its
table; its report module holds only its pure arithmetic. Scripts run as ``python benchmarks/X.py``
and import siblings by bare name (``benchmarks/`` is ``sys.path[0]``); tests put ``benchmarks/`` on
the path the same way (``tests/conftest.py``).
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/, benchmarks/results/, servers' cwd
