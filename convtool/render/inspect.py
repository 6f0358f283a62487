"""The `convtool inspect` table, from an :class:`~convtool.describe.InspectResult`.

At a narrow width the columns go in this order: weight, bias, dil., groups, kind, input.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from convtool.describe import InspectResult, LayerInfo
from convtool.render.common import (
    Col,
    dropped_note,
    fitted_table,
    human_count,
    print_fitted,
    shape_str,
    stdout,
)

DROP_ORDER = ("weight", "bias", "dil.", "groups", "kind", "input")


def _tuple(value: Any) -> str:
    """(1, 1) -> '1', (2, 1) -> '2,1': per-dim values as narrow as they go."""
    if isinstance(value, str):
        return value
    values = [str(v) for v in value]
    return values[0] if len(set(values)) == 1 else ",".join(values)


def _shape(shape: Any) -> str:
    return "-" if shape is None else "(" + ",".join(str(s) for s in shape) + ")"


def _padding(layer: LayerInfo) -> str:
    text = _tuple(layer.padding)
    return text if layer.padding_mode == "zeros" else f"{text} {layer.padding_mode}"


def render_inspect(result: InspectResult, console: Console | None = None) -> None:
    """One row per conv layer: hyperparameters and, with an example input, its shapes."""
    out = console or stdout()
    with_shapes = any(layer.input_shape is not None for layer in result.layers)
    title = f"{result.source} ({result.kind}): {len(result.layers)} conv layer(s)"
    if result.input_shape is not None:
        title += f", example input {shape_str(result.input_shape)}"
    cols = [
        Col("layer", name=True, style="bold"),
        Col("kind"),
        Col("weight"),
        Col("stride"),
        Col("padding"),
        Col("dil."),
        Col("groups", right=True),
        Col("bias"),
    ]
    if with_shapes:
        cols += [Col("input"), Col("output")]
    cols.append(Col("params", right=True))
    rows = []
    for layer in result.layers:
        row = [
            layer.name or "(model)",
            layer.kind,
            _shape(layer.weight_shape),
            _tuple(layer.stride),
            _padding(layer),
            _tuple(layer.dilation),
            str(layer.groups),
            "yes" if layer.bias else "no",
        ]
        if with_shapes:
            row += [_shape(layer.input_shape), _shape(layer.output_shape)]
        row.append(human_count(layer.params))
        rows.append(row)
    table, dropped = fitted_table(cols, rows, out.width, DROP_ORDER, title=title)
    caption = [f"conv parameters: {result.conv_params:,}"]
    if dropped:
        caption.append(dropped_note(dropped))
    table.caption = "\n".join(caption)
    table.caption_justify = "left"
    print_fitted(out, table)
