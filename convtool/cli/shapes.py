"""`--input-shape` text -> the library's shape functions (:mod:`convtool.describe`)."""

from __future__ import annotations

from convtool.cli.options import parse_shape
from convtool.describe import layer_input_shape as _layer_input_shape
from convtool.describe import resolve_shapes as _resolve_shapes
from convtool.io.source import ConvLayer, Source
from convtool.models import Capture


def _parsed(input_shape: str | None) -> tuple[int, ...] | None:
    return None if input_shape is None else parse_shape(input_shape)


def resolve_shapes(src: Source, input_shape: str | None) -> Capture | None:
    """:func:`convtool.describe.resolve_shapes` with the option's text."""
    return _resolve_shapes(src, _parsed(input_shape))


def layer_input_shape(src: Source, layer: ConvLayer, input_shape: str | None) -> tuple[int, ...]:
    """:func:`convtool.describe.layer_input_shape` with the option's text."""
    return _layer_input_shape(src, layer, _parsed(input_shape))
