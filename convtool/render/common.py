"""Consoles and number formatting shared by every renderer."""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from convtool.resources import human_bytes

__all__ = [
    "Col",
    "dropped_note",
    "emit_json",
    "fitted_table",
    "human_bytes",
    "human_count",
    "name_width",
    "print_fitted",
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


# ---------------------------------------------------------------------------------- fitted tables
@dataclass(frozen=True)
class Col:
    """One column of a fitted table.

    Attributes:
        key: the name `drop` orders refer to (usually the header).
        header: the heading shown.
        right: right-justified (numbers).
        name: the layer-name column: wraps after a '.', never inside a name component.
        style: rich style of the cells.
        markup: the cells hold rich markup (`[green]pass[/green]`).
    """

    key: str
    header: str = ""
    right: bool = False
    name: bool = False
    style: str | None = None
    markup: bool = False


def _wrap_name(name: str, width: int) -> str:
    """'features.0.conv1' at width 11 -> 'features.0.\nconv1': breaks only after a '.'."""
    parts = re.findall(r"[^.]+\.?|\.", name) or [name]
    lines = [""]
    for part in parts:
        if lines[-1] and cell_len(lines[-1] + part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _min_name_width(names: Sequence[str]) -> int:
    return max((cell_len(p) for n in names for p in re.findall(r"[^.]+\.?", n)), default=1)


def _build(
    cols: Sequence[Col],
    rows: Sequence[Sequence[str]],
    keep: Sequence[bool],
    name_width: int | None,
    sections: Sequence[int],
    kwargs: dict[str, Any],
) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        title_justify="left",
        **kwargs,
    )
    for col, kept in zip(cols, keep, strict=True):
        if kept:
            table.add_column(
                col.header or col.key,
                justify="right" if col.right else "left",
                no_wrap=True,
                style=col.style,
            )
    for i, row in enumerate(rows):
        if i in sections:
            table.add_section()
        cells = []
        for col, kept, cell in zip(cols, keep, row, strict=True):
            if kept:
                wrapped = _wrap_name(cell, name_width) if col.name and name_width else cell
                cells.append(Text.from_markup(wrapped) if col.markup else Text(wrapped))
        table.add_row(*cells)
    return table


def natural_width(table: Table) -> int:
    """Columns `table` takes when nothing in it wraps."""
    return _natural(table)


def _natural(table: Table) -> int:
    wide = Console(width=100_000, file=io.StringIO(), color_system=None)
    return Measurement.get(wide, wide.options, table).maximum


def fitted_table(
    cols: Sequence[Col],
    rows: Sequence[Sequence[str]],
    width: int,
    drop: Sequence[str] = (),
    sections: Sequence[int] = (),
    **kwargs: Any,
) -> tuple[Table, list[str]]:
    """A table that fits `width` columns without cutting a name or a number.

    Cells are never cut, and only the name column wraps. While the table is too wide, the name
    column first wraps at '.' (never inside a name component, and only as much as needed); if
    that is not enough, the next column named in `drop` is left out, and so on. A table that
    still does not fit is printed wider than `width` (see :func:`print_fitted`).

    Args:
        cols: the columns, in order.
        rows: one string per column per row.
        width: the console's width.
        drop: keys of the columns that may go, first to go first.
        sections: row indices that start a new section (a rule above them).
        kwargs: passed on to `rich.table.Table` (title, caption, ...).

    Returns:
        The table, and the headers of the columns left out.
    """
    keep = [True] * len(cols)
    order = [i for key in drop for i, c in enumerate(cols) if c.key == key]
    names = [row[i] for row in rows for i, c in enumerate(cols) if c.name]
    while True:
        table = _build(cols, rows, keep, None, sections, kwargs)
        excess = _natural(table) - width
        if excess <= 0:
            break
        if names:  # first wrap the names at '.', only as much as needed
            longest = max(cell_len(n) for n in names)
            target = max(_min_name_width(names), longest - excess)
            table = _build(cols, rows, keep, target, sections, kwargs)
            if _natural(table) <= width:
                break
        if not order:
            break
        keep[order.pop(0)] = False
    dropped = [c.header or c.key for c, k in zip(cols, keep, strict=True) if not k]
    return table, dropped


def print_fitted(console: Console, table: Table) -> None:
    """Print `table` whole: a table wider than the console widens the output instead of being
    cut (the terminal wraps the long lines)."""
    need = _natural(table)
    if need <= console.width:
        console.print(table)
        return
    wide = Console(file=console.file, width=need, no_color=console.no_color)
    wide.print(table)


def dropped_note(dropped: Sequence[str]) -> str:
    """The caption line that says which columns the width left out."""
    return f"not shown at this width: {', '.join(dropped)} (widen the terminal, or use JSON)"
