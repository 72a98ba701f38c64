"""Benchmark defaults: YAML under ``configs/``, a ``cpu:``/``gpu:`` section merged over the top level
for the device in use, then the command line's explicit values on top.

Contract: ``load_config`` never returns the device sections; ``override`` copies only values the user
gave (not None); ``select`` keeps the config's order and refuses unknown names with the known ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness import REPO_ROOT


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``: mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """The YAML at ``path`` (relative: to the repository root) with its ``device`` section merged in."""
    import yaml

    p = Path(path)
    p = p if p.is_absolute() or p.exists() else REPO_ROOT / p
    if not p.exists():
        raise SystemExit(f"config {path} not found")
    raw = yaml.safe_load(p.read_text()) or {}
    sections = {k: raw.pop(k, None) or {} for k in ("cpu", "gpu")}
    return merge(raw, sections.get(device, {}))


def override(cfg: dict[str, Any], args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """``cfg`` with ``args.<key>`` for each key the user set (not None)."""
    return {**cfg, **{k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}}


def select(known: Sequence[str], wanted: str | Sequence[str] | None, what: str = "providers") -> list[str]:
    """The ``known`` names in ``wanted`` (comma-separated or a list; None: all), in ``known``'s order."""
    if not wanted:
        return list(known)
    names = wanted.split(",") if isinstance(wanted, str) else list(wanted)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {list(known)}")
    return [k for k in known if k in names]


def int_list(text: str) -> list[int]:
    """A comma-separated option, ``1000,3000`` -> ``[1000, 3000]`` (an argparse ``type``)."""
    return [int(x) for x in text.split(",") if x.strip()]


def add_typed_options(parser: argparse.ArgumentParser, options: Iterable[tuple[str, type]]) -> None:
    """``--name`` options (dest ``name`` with ``_``) that default to None, so ``override`` sees only
    what the user typed."""
    for name, typ in options:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
