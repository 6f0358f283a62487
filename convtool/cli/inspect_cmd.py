"""`convtool inspect`: list every conv layer of a SOURCE, with its shapes for an example input."""

from __future__ import annotations

import typer

from convtool.cli import options as opt
from convtool.cli import shapes as sh
from convtool.cli.app import app
from convtool.describe import inspect_source
from convtool.errors import ConvtoolError
from convtool.render.common import emit_json
from convtool.render.inspect import render_inspect
from convtool.source import check_finite


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
    allow_nonfinite: opt.AllowNonfiniteOpt = False,
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
    if not allow_nonfinite:
        for conv in [src.select(layer)] if layer is not None else src.layers:
            check_finite(conv)
    shape = opt.parse_shape(input_shape) if input_shape is not None else None
    result = inspect_source(src, shape, layer)
    for note in result.notes:
        typer.echo(f"convtool: note: {note}", err=True)
    if json_out:
        emit_json(result.to_dict())
    else:
        render_inspect(result)
