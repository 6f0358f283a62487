"""Which input shape a layer gets: from --input-shape for a kernel, from tracing for a model.

For a model, `--input-shape` is the full example input (batch included); the model runs once on
zeros of that shape and every conv's input is recorded (see :mod:`convtool.models`). A
torch.export program knows the shapes it was exported with, so it needs no --input-shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from convtool.cli.options import parse_shape
from convtool.errors import ConvtoolError
from convtool.inventory import ConvLayer, Inventory, layer_sample
from convtool.io.source import Source
from convtool.models import trace_source

Capture = Inventory


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
    with run_hints():
        return trace_source(src, parse_shape(input_shape))


@contextlib.contextmanager
def run_hints() -> Iterator[None]:
    """A model that cannot run: the CLI's line names the flags that help (the library's
    names the parameters)."""
    try:
        yield
    except ConvtoolError as exc:
        text = str(exc)
        if "running the model" not in text or " (is the example" not in text:
            raise
        raise ConvtoolError(f"{text.split(' (is the example')[0]}{RUN_HINT}") from None


RUN_HINT = (
    " (is --input-shape the model's full input, batch included? If its forward needs more "
    "arguments, pass them with --forward-kwargs JSON; for one layer's matrix, give --layer NAME "
    "--layer-input-shape C_in,*spatial, which runs nothing)"
)


def pick_layer(
    src: Source, name: str | None, input_shape: str | None, layer_input: str | None = None
) -> ConvLayer:
    """The layer a single-layer command works on, after tracing when the model must run.

    With `--layer-input-shape` nothing runs: the layer comes from what the source lists
    without running (its conv modules, a graph's conv nodes).
    """
    if layer_input is None and src.is_model and input_shape is not None:
        resolve_shapes(src, input_shape)
    return src.select(name)


def layer_input_shape(
    src: Source, layer: ConvLayer, input_shape: str | None, layer_input: str | None = None
) -> tuple[int, ...]:
    """One sample `(C_in, *spatial)` for `layer`, or a clear error saying what to pass.

    `layer_input` (`--layer-input-shape`) is the layer's own one-sample input: the model is
    not run.
    """
    if layer_input is not None:
        return layer_sample(layer, parse_shape(layer_input, "--layer-input-shape"))
    if src.kind == "kernel":
        if input_shape is None:
            dims = ",".join(("D", "H", "W")[3 - layer.spec.ndim :])
            raise ConvtoolError(
                f"--input-shape is required for a kernel file: one sample C,{dims}, e.g. "
                f"{_example(layer)}"
            )
        return layer.spec.checked_sample(parse_shape(input_shape))
    cap = resolve_shapes(src, input_shape)
    layer = next((x for x in src.layers if x.name == layer.name), layer)  # the traced record
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
    if layer.skipped is not None:
        raise ConvtoolError(f"layer {layer.name!r}: {layer.skipped} (--input-shape)")
    raise ConvtoolError(
        f"the input shape of layer {layer.name!r} is unknown; pass --input-shape with the "
        f"model's full example input, batch included, e.g. 1,{_example(layer)}, or the layer's "
        f"own one-sample input with --layer-input-shape {_example(layer)}"
    )
