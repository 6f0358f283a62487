"""The `convtool convert` summary (from the dict `--json` prints)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

from convtool.render.common import human_bytes, human_count, stdout


def _shape(shape: Any) -> str:
    return "(" + ",".join(str(s) for s in shape) + ")"


def _ratio(after: int, before: int) -> str:
    return f"x{after / before:,.1f}" if before else "-"


def render_convert(result: dict[str, Any]) -> None:
    """One row per converted layer with its parameter change, then the model's totals."""
    form = {"lc": "locally connected", "fc": "fully connected"}[result["to"]]
    if result["to"] == "fc":
        form += ", sparse" if result["sparse"] else ", dense"
    table = Table(
        title=f"{result['source']} -> {result['output']} ({form})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("layer", style="bold", overflow="fold")
    table.add_column("conv")
    table.add_column("replaced by", no_wrap=True)
    table.add_column("input", no_wrap=True)
    table.add_column("output", no_wrap=True)
    table.add_column("params", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_column("size", justify="right")
    for layer in result["layers"]:
        table.add_row(
            layer["name"] or "(model)",
            layer["kind"],
            layer["replacement"],
            _shape(layer["input_shape"]),
            _shape(layer["output_shape"]),
            human_count(layer["params_before"]),
            human_count(layer["params_after"]),
            _ratio(layer["params_after"], layer["params_before"]),
            human_bytes(layer["bytes_after"]),
        )
    before, after = result["params_before"], result["params_after"]
    table.caption = (
        f"{len(result['layers'])} layer(s) converted; values stored (parameters and buffers) "
        f"{before:,} -> {after:,} "
        f"({_ratio(after, before)}); wrote {human_bytes(result['bytes_written'])} as "
        f"{result['format']} in {result['seconds']:.2f} s"
    )
    table.caption_justify = "left"
    stdout().print(table)
