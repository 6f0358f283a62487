"""`convtool inspect`: list every conv layer of a SOURCE, with its shapes for an example input."""

from __future__ import annotations

from typing import Any

import typer

from convtool.cli import options as opt
from convtool.cli import shapes as sh
from convtool.cli.app import app
from convtool.cli.shapes import resolve_shapes
from convtool.errors import ConvtoolError
from convtool.inventory import ConvLayer, layer_output_shape
from convtool.io.source import Source
from convtool.render.common import emit_json
from convtool.render.inspect import render_inspect


def _layer_dict(layer: ConvLayer) -> dict[str, Any]:
    spec = layer.spec
    out: dict[str, Any] = {
        "name": layer.name,
        "kind": spec.kind,
        "weight_shape": list(layer.weight.shape),
        "in_channels": spec.in_channels,
        "out_channels": spec.out_channels,
        "kernel_size": list(spec.kernel_size),
        "stride": list(spec.stride),
        "padding": spec.padding if isinstance(spec.padding, str) else list(spec.padding),
        "padding_mode": spec.padding_mode,
        "dilation": list(spec.dilation),
        "groups": spec.groups,
        "bias": layer.bias is not None,
        "params": layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0),
        "input_shape": None,
        "output_shape": None,
    }
    if spec.transposed:
        out["output_padding"] = list(spec.output_padding)
    out["call"] = layer.call
    if layer.pre_pad is not None:  # asymmetric (ONNX) pads: (begin, end) per spatial dim
        out["padding"] = [list(pair) for pair in layer.pre_pad]
    if layer.post_crop is not None:
        out["output_crop"] = [list(pair) for pair in layer.post_crop]
    if layer.skipped is not None:
        out["skipped"] = layer.skipped
    if layer.input_shape is not None:
        out["input_shape"] = list(layer.input_shape)
        out["output_shape"] = list(layer_output_shape(layer, layer.input_shape))
    return out


def inspect_result(src: Source, input_shape: str | None, only: str | None) -> dict[str, Any]:
    """The dict `--json` prints; the table renders the same."""
    cap = resolve_shapes(src, input_shape)
    layers = [src.select(only)] if only is not None else src.layers
    notes = list(src.notes)
    if cap is not None:
        notes += [f"left as it is: {f.describe()}" for f in cap.functional]
        notes += [
            f"conv {n!r} is called on several input shapes: {', '.join(map(str, seen))}"
            for n, seen in cap.conflicts.items()
        ]
    if src.is_model and src.traced_shape is not None and src.kind != "onnx":
        notes += [
            f"conv {layer.name!r} is not called on the example input"
            for layer in layers
            if layer.input_shape is None
        ]
    return {
        "source": str(src.path),
        "kind": src.kind,
        "input_shape": list(src.traced_shape) if src.traced_shape is not None else None,
        "layers": [_layer_dict(layer) for layer in layers],
        "conv_params": sum(
            layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
            for layer in layers
        ),
        "notes": notes,
    }


@app.command("inspect", no_args_is_help=True)
def inspect_command(
    source: opt.SourceArg,
    input_shape: opt.InputShapeOpt = None,
    json_out: opt.JsonOpt = False,
    layer: opt.LayerOpt = None,
    stride: opt.StrideOpt = "1",
    padding: opt.PaddingOpt = "0",
    dilation: opt.DilationOpt = "1",
    groups: opt.GroupsOpt = 1,
    padding_mode: opt.PaddingModeOpt = "zeros",
    transposed: opt.TransposedOpt = False,
    output_padding: opt.OutputPaddingOpt = "0",
    bias: opt.BiasOpt = None,
    model: opt.ModelOpt = None,
    model_kwargs: opt.ModelKwargsOpt = None,
    allow_pickle: opt.AllowPickleOpt = False,
    forward_kwargs: opt.ForwardKwargsOpt = None,
    layer_input_shape: opt.LayerInputShapeOpt = None,
) -> None:
    """List every conv layer: kind, weight shape, stride, padding (mode), dilation, groups, bias;
    with --input-shape also each layer's input and output shapes.

    Examples: convtool inspect model.pt2; convtool inspect weights.pt --model mypkg.nets:make_net
    --input-shape 1,3,32,32
    """
    src = opt.open_source(
        source,
        layer,
        bias,
        model,
        model_kwargs,
        allow_pickle,
        opt.conv_flags(stride, padding, dilation, groups, padding_mode, transposed, output_padding),
        forward_kwargs,
    )
    if layer_input_shape is not None:
        if layer is None or input_shape is not None:
            raise ConvtoolError(
                "--layer-input-shape goes with --layer NAME (that layer's own input), instead "
                "of --input-shape"
            )
        one = src.select(layer)
        one.input_shape = sh.layer_input_shape(src, one, None, layer_input_shape)
    result = inspect_result(src, input_shape, layer)
    for note in result["notes"]:
        typer.echo(f"convtool: note: {note}", err=True)
    if json_out:
        emit_json(result)
    else:
        render_inspect(result)
