"""Consoles and number formatting shared by every renderer."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from convtool.resources import human_bytes

__all__ = [
    "emit_json",
    "human_bytes",
    "human_count",
    "name_width",
    "shape_str",
    "stderr",
    "stdout",
]


def stdout() -> Console:
    """Console on stdout. Width comes from the terminal, or COLUMNS, or 160 when piped."""
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else _width())


def stderr() -> Console:
    return Console(file=sys.stderr, width=None if sys.stderr.isatty() else _width())


def _width() -> int:
    import os

    try:
        return int(os.environ.get("COLUMNS", "160"))
    except ValueError:
        return 160


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def human_count(n: float) -> str:
    """26136 -> '26.1 K'; 3.4e9 -> '3.4 G'; small numbers as they are."""
    if abs(n) < 1000:
        return f"{n:g}" if isinstance(n, float) else str(n)
    for unit in ("K", "M", "G", "T", "P", "E"):
        n /= 1000
        if abs(n) < 1000 or unit == "E":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def shape_str(shape: Any) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if shape is not None else "-"


def name_width(names: Any, cap: int = 28) -> int:
    """Width for a layer-name column: the longest name up to `cap`, so short names never fold."""
    return min(cap, max((len(str(n)) for n in names), default=4))
