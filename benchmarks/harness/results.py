"""Writing a benchmark's results: CSV, JSON, the summary's header, PNG figures.

Contracts: CSV columns are the row dataclass's fields in order (or the given ``columns``), None is an
empty cell and floats keep ``repr`` precision, so a reader gets back what was written; parent folders
are created; every function returns the path it wrote.
"""

from __future__ import annotations

import csv
import json
import shlex
import sys
import typing
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from harness import REPO_ROOT


def out_path(path: str | Path) -> Path:
    """``path`` as given when absolute, else under the repository root (configs name folders that way)."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def _mkparent(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def write_rows(rows: Iterable[Any], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Rows (dataclass instances or dicts) as CSV. Columns: ``columns`` (a projection: other keys of a
    row are left out, a missing one is an empty cell), else the first row's dataclass fields or dict
    keys. An empty ``rows`` writes just the header when ``columns`` is known."""
    rows = [asdict(r) if is_dataclass(r) else dict(r) for r in rows]
    names = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    out = _mkparent(path)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return out


def columns_of(cls: type) -> tuple[str, ...]:
    """The CSV header of a row dataclass."""
    return tuple(f.name for f in fields(cls))


def read_rows(path: str | Path, cls: type) -> list[Any]:
    """The inverse of ``write_rows`` for rows of dataclass ``cls`` whose fields are ``int``, ``float``,
    ``bool`` or ``str``, each optionally ``| None``: a cell is converted by its field's type, an empty
    cell of an optional field is None (so an optional ``str`` cannot hold ""). Raises ValueError when
    the header is not ``cls``'s fields in order, a cell does not parse, or a field has another type."""
    hints = typing.get_type_hints(cls)
    types = {f.name: hints[f.name] for f in fields(cls)}
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != tuple(types):
            raise ValueError(f"{path}: header {reader.fieldnames} != {list(types)}")
        return [cls(**{k: _cell(v, types[k]) for k, v in rec.items()}) for rec in reader]


def _cell(raw: str, hint: Any) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise ValueError(f"unsupported CSV field type {hint}")
        if raw == "":
            return None
        hint = rest[0]
    if hint is bool:
        if raw not in ("True", "False"):
            raise ValueError(f"not a bool: {raw!r}")
        return raw == "True"
    if hint in (int, float, str):
        return hint(raw)
    raise ValueError(f"unsupported CSV field type {hint}")


def write_json(obj: Any, path: str | Path) -> Path:
    out = _mkparent(path)
    out.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return out


def write_text(text: str, path: str | Path) -> Path:
    out = _mkparent(path)
    out.write_text(text)
    return out


_recorded: list[str] | None = None


def record_command(script: str, args: Sequence[str] | None) -> None:
    """Called first by a script's ``main(argv)``: the run is ``script`` with ``args`` (None: this
    process's own arguments), also when ``main`` is called from code or a test."""
    global _recorded
    _recorded = [script, *(sys.argv[1:] if args is None else args)]


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this run was started, as a user would type it: ``python benchmarks/X.py ARGS``
    (``argv``; else what ``record_command`` recorded; else ``sys.argv``)."""
    argv = argv if argv is not None else (_recorded or sys.argv)
    script = Path(argv[0])
    shown = f"benchmarks/{script.name}" if script.parent.name == "benchmarks" else str(script)
    return shlex.join(["python", shown, *argv[1:]])


def summary_header(title: str, details: str = "", machine: str | None = None, command: str | None = None) -> str:
    """The top of every ``summary.md``: title, the exact command (default ``command_line()``), run
    details, the machine line."""
    lines = [f"# {title}", "", f"command: `{command or command_line()}`" + (f"; {details}" if details else "")]
    if machine:
        lines += ["", machine]
    return "\n".join(lines) + "\n\n"


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (benchmarks run without a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close ``fig``."""
    out = _mkparent(path)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out
