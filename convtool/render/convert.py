"""The `convtool convert` summary, from a :class:`~convtool.describe.ConvertResult`.

At a narrow width the columns go in this order: conv, input, replaced by, output.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from convtool.describe import FORMAT_NAMES, ConvertResult
from convtool.forms import ModelTarget
from convtool.render.common import (
    Col,
    dropped_note,
    fitted_table,
    human_bytes,
    human_count,
    print_fitted,
    stdout,
)

DROP_ORDER = ("conv", "input", "replaced by", "output")


def _shape(shape: Any) -> str:
    return "(" + ",".join(str(s) for s in shape) + ")"


def _ratio(after: int, before: int) -> str:
    return f"x{after / before:,.1f}" if before else "-"


def render_convert(result: ConvertResult, console: Console | None = None) -> None:
    """One row per converted layer with its parameter change, then the model's totals."""
    out = console or stdout()
    report = result.report
    form = {ModelTarget.LC: "locally connected", ModelTarget.FC: "fully connected"}[
        ModelTarget(report.to)
    ]
    if report.to == ModelTarget.FC:
        form += ", sparse" if report.sparse else ", dense"
    cols = [
        Col("layer", name=True, style="bold"),
        Col("conv"),
        Col("replaced by"),
        Col("input"),
        Col("output"),
        Col("params", right=True),
        Col("after", right=True),
        Col("change", right=True),
        Col("size", right=True),
    ]
    rows = [
        [
            layer.name or "(model)",
            layer.kind,
            layer.replacement,
            _shape(layer.input_shape),
            _shape(layer.output_shape),
            human_count(layer.params_before),
            human_count(layer.params_after),
            _ratio(layer.params_after, layer.params_before),
            human_bytes(layer.bytes_after),
        ]
        for layer in report.layers
    ]
    table, dropped = fitted_table(
        cols, rows, out.width, DROP_ORDER, title=f"{result.source} -> {result.output} ({form})"
    )
    before, after = report.params_before, report.params_after
    fmt = FORMAT_NAMES.get(result.format, result.format)
    caption = [
        f"{len(report.layers)} layer(s) converted; values stored (parameters and buffers) "
        f"{before:,} -> {after:,} ({_ratio(after, before)}); wrote "
        f"{human_bytes(result.bytes_written)} as {fmt} in {result.seconds:.2f} s"
    ]
    if dropped:
        caption.append(dropped_note(dropped))
    table.caption = "\n".join(caption)
    table.caption_justify = "left"
    print_fitted(out, table)
