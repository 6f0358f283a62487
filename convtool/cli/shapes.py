"""Which input shape a layer gets: from --input-shape for a kernel, from tracing for a model.

For a model, `--input-shape` is the full example input (batch included); the model runs once on
zeros of that shape and every conv's input is recorded (see :mod:`convtool.models`). A
torch.export program knows the shapes it was exported with, so it needs no --input-shape.
"""

from __future__ import annotations

from convtool.cli.options import parse_shape
from convtool.errors import ConvtoolError
from convtool.io.source import ConvLayer, Source
from convtool.models import Capture, trace_source


def _example(layer: ConvLayer) -> str:
    return ",".join([str(layer.spec.in_channels)] + ["32"] * layer.spec.ndim)


def resolve_shapes(src: Source, input_shape: str | None) -> Capture | None:
    """Fill `layer.input_shape` for every layer of `src`; the model's capture, if it ran.

    A kernel takes one sample `C,H,W` (a leading batch accepted); a model its full example input.
    Without --input-shape only what the source already knows is filled (export programs).
    """
    if src.kind == "kernel":
        if input_shape is not None:
            shape = parse_shape(input_shape)
            for layer in src.layers:
                layer.input_shape = layer.spec.checked_sample(shape)
        return None
    if input_shape is None:
        return src.capture
    return trace_source(src, parse_shape(input_shape))


def layer_input_shape(src: Source, layer: ConvLayer, input_shape: str | None) -> tuple[int, ...]:
    """One sample `(C_in, *spatial)` for `layer`, or a clear error saying what to pass."""
    if src.kind == "kernel":
        if input_shape is None:
            dims = ",".join(("D", "H", "W")[3 - layer.spec.ndim :])
            raise ConvtoolError(
                f"--input-shape is required for a kernel file: one sample C,{dims}, e.g. "
                f"{_example(layer)}"
            )
        return layer.spec.checked_sample(parse_shape(input_shape))
    cap = resolve_shapes(src, input_shape)
    if cap is not None and layer.name in cap.conflicts:
        seen = ", ".join(str(s) for s in cap.conflicts[layer.name])
        raise ConvtoolError(
            f"layer {layer.name!r} is called on several input shapes ({seen}); its matrix is "
            f"not unique"
        )
    if layer.input_shape is not None:
        return layer.input_shape
    if src.traced_shape is not None:
        shape = ",".join(map(str, src.traced_shape))
        raise ConvtoolError(
            f"layer {layer.name!r} is not called when the model runs on an input of shape "
            f"{shape}, so its input shape is unknown"
        )
    raise ConvtoolError(
        f"the input shape of layer {layer.name!r} is unknown; pass --input-shape with the "
        f"model's full example input, batch included, e.g. 1,{_example(layer)}"
    )
