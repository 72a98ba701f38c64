"""``benchmarks/`` is a script folder (``python benchmarks/X.py``) whose modules import each other and
the harness by bare name; tests import them the same way, so each module is loaded once."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
