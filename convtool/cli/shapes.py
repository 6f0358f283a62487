"""Which input shape a layer gets: from --input-shape for a kernel, from tracing for a model."""

from __future__ import annotations

from convtool.cli.options import parse_shape
from convtool.errors import ConvtoolError
from convtool.io.source import ConvLayer, Source


def layer_input_shape(src: Source, layer: ConvLayer, input_shape: str | None) -> tuple[int, ...]:
    """One sample `(C_in, *spatial)` for `layer`, or a clear error saying what to pass."""
    if src.kind == "kernel":
        if input_shape is None:
            raise ConvtoolError(
                f"--input-shape is required for a kernel file: one sample C,{'H,W'[:0]}"
                f"{','.join(('D', 'H', 'W')[3 - layer.spec.ndim:])}, e.g. "
                f"{layer.spec.in_channels},{','.join(['32'] * layer.spec.ndim)}"
            )
        return layer.spec.sample_shape(parse_shape(input_shape))
    if layer.input_shape is not None:
        return layer.input_shape
    raise ConvtoolError(
        f"the input shape of layer {layer.name!r} is unknown; pass --input-shape with the "
        f"model's example input, e.g. 1,3,224,224"
    )
