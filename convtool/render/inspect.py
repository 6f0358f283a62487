"""The `convtool inspect` table (from the dict `--json` prints)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

from convtool.render.common import human_count, shape_str, stdout


def _tuple(value: Any) -> str:
    """(1, 1) -> '1', (2, 1) -> '2,1': per-dim values as narrow as they go."""
    if isinstance(value, str):
        return value
    values = [str(v) for v in value]
    return values[0] if len(set(values)) == 1 else ",".join(values)


def _shape(shape: Any) -> str:
    return "-" if shape is None else "(" + ",".join(str(s) for s in shape) + ")"


def _padding(layer: dict[str, Any]) -> str:
    text = _tuple(layer["padding"])
    return text if layer["padding_mode"] == "zeros" else f"{text} {layer['padding_mode']}"


def render_inspect(result: dict[str, Any]) -> None:
    """One row per conv layer: hyperparameters and, with an example input, its shapes."""
    with_shapes = any(layer.get("input_shape") is not None for layer in result["layers"])
    title = f"{result['source']} ({result['kind']}): {len(result['layers'])} conv layer(s)"
    if result.get("input_shape") is not None:
        title += f", example input {shape_str(result['input_shape'])}"
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("layer", style="bold", overflow="fold")
    table.add_column("kind")
    table.add_column("weight", no_wrap=True)
    table.add_column("stride", no_wrap=True)
    table.add_column("padding", no_wrap=True)
    table.add_column("dil.")
    table.add_column("groups", justify="right")
    table.add_column("bias")
    if with_shapes:
        table.add_column("input", no_wrap=True)
        table.add_column("output", no_wrap=True)
    table.add_column("params", justify="right")
    for layer in result["layers"]:
        row = [
            layer["name"] or "(model)",
            layer["kind"],
            _shape(layer["weight_shape"]),
            _tuple(layer["stride"]),
            _padding(layer),
            _tuple(layer["dilation"]),
            str(layer["groups"]),
            "yes" if layer["bias"] else "no",
        ]
        if with_shapes:
            row += [_shape(layer.get("input_shape")), _shape(layer.get("output_shape"))]
        row.append(human_count(layer["params"]))
        table.add_row(*row)
    table.caption = f"conv parameters: {result['conv_params']:,}"
    table.caption_justify = "left"
    stdout().print(table)
