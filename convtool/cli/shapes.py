"""`--input-shape` / `--layer-input-shape` text -> the library's shape functions
(:mod:`convtool.describe`, which owns the logic and speaks through :mod:`convtool.inventory`)."""

from __future__ import annotations

from convtool.cli.options import parse_shape
from convtool.describe import layer_input_shape as _layer_input_shape
from convtool.describe import pick_layer as _pick_layer
from convtool.describe import resolve_shapes as _resolve_shapes
from convtool.inventory import ConvLayer, Inventory
from convtool.source import Source

Capture = Inventory  # the name earlier releases used


def _parsed(text: str | None, option: str = "--input-shape") -> tuple[int, ...] | None:
    return None if text is None else parse_shape(text, option)


def resolve_shapes(src: Source, input_shape: str | None) -> Inventory | None:
    """:func:`convtool.describe.resolve_shapes` with the option's text."""
    return _resolve_shapes(src, _parsed(input_shape))


def pick_layer(
    src: Source, name: str | None, input_shape: str | None, layer_input: str | None = None
) -> ConvLayer:
    """:func:`convtool.describe.pick_layer` with the options' text."""
    return _pick_layer(src, name, _parsed(input_shape), _parsed(layer_input, "--layer-input-shape"))


def layer_input_shape(
    src: Source, layer: ConvLayer, input_shape: str | None, layer_input: str | None = None
) -> tuple[int, ...]:
    """:func:`convtool.describe.layer_input_shape` with the options' text."""
    return _layer_input_shape(
        src, layer, _parsed(input_shape), _parsed(layer_input, "--layer-input-shape")
    )
