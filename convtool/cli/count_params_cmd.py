"""`convtool count-params`: what each form of each conv layer costs, before anyone builds it."""

from __future__ import annotations

import re
import sys
from typing import Annotated

import typer
from rich.table import Table

from convtool.cli import options as opt
from convtool.cli.app import app
from convtool.cli.flags import cli_text
from convtool.cli.shapes import layer_input_shape
from convtool.describe import count_shapes
from convtool.errors import ConvtoolError
from convtool.params import count_layers, region_form_counts
from convtool.render.common import emit_json, human_bytes, human_count, stdout
from convtool.render.params import render_report, report_csv, report_json
from convtool.source import Source, check_finite

LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Shell globs (comma-separated) of the conv layers to list and convert in the "
        "totals, e.g. 'layer1.*,conv1'. Default: all.",
    ),
]
CsvOpt = Annotated[bool, typer.Option("--csv", help="Print CSV on stdout instead of tables.")]


def _exact(name: str) -> str:
    """A glob that matches exactly `name`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@app.command("count-params", no_args_is_help=True)
def count_params_command(
    source: opt.SourceArg,
    input_shape: opt.InputShapeOpt = None,
    layers: LayersOpt = None,
    json_out: opt.JsonOpt = False,
    csv_out: CsvOpt = False,
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
    roi: opt.RoiOpt = None,
) -> None:
    """Count the parameters, memory and multiply-adds of each conv layer as conv, locally
    connected (LC) and fully connected (FC) layers, analytically (nothing is built).

    Examples: convtool count-params kernel.npy --input-shape 3,24,24;
    convtool count-params weights.pt --model mypkg.nets:resnet18 --input-shape 1,3,224,224 --json;
    convtool count-params kernel.npy --input-shape 3,24,24 --roi 4:12,4:12 (one layer's region form)
    """
    if json_out and csv_out:
        raise ConvtoolError("--json and --csv both given; pick one output format")
    if layer is not None and layers is not None:
        raise ConvtoolError(
            f"--layer {layer!r} and --layers {layers!r} both given; use --layers for several"
        )
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
    plan = count_shapes(
        src,
        opt.parse_shape(input_shape) if input_shape is not None else None,
        layer,
        opt.parse_shape(layer_input_shape, "--layer-input-shape")
        if layer_input_shape is not None
        else None,
    )
    for line in plan.warnings:
        typer.echo(f"convtool: warning: {cli_text(line)}", err=True)
    # after tracing: a functional call's name (`F.conv1d#0`) exists only once the model ran
    if not allow_nonfinite:
        for conv in [src.select(layer)] if layer is not None else src.layers:
            check_finite(conv)
    if roi is not None:
        _region_report(src, layer, layers, input_shape, roi, json_out, csv_out)
        return
    pattern = layers
    if layer is not None:
        pattern = _exact(src.select(layer).name)
    example = None
    if src.kind != "kernel":
        example = src.traced_shape or src.example_shape
    report = count_layers(
        src.layers,
        model=src.model,
        input_shapes=plan.shapes,
        pattern=pattern,
        non_conv_known=src.kind == "kernel" or src.model is not None,
        example_input_shape=example,
        missing={name: cli_text(why) for name, why in plan.missing.items()},
        notes=[*src.notes, *map(cli_text, plan.notes)],
    )
    if json_out:
        report_json(report, str(source))
    elif csv_out:
        sys.stdout.write(report_csv(report))
    else:
        render_report(report)


def _region_report(
    src: Source,
    layer: str | None,
    layers: str | None,
    input_shape: str | None,
    roi: str,
    json_out: bool,
    csv_out: bool,
) -> None:
    """`--roi`: the region form of one layer (its rows of T), counted without building it."""
    if layers is not None or csv_out:
        raise ConvtoolError("--roi counts one layer: use --layer NAME (not --layers or --csv)")
    if layer is None and len(src.layers) != 1:
        names = ", ".join(c.name for c in src.layers[:5])
        raise ConvtoolError(f"--roi counts one layer; pick it with --layer (one of: {names})")
    conv = src.select(layer)
    if input_shape is None and src.kind == "kernel":
        raise ConvtoolError("--roi needs --input-shape (one sample C,H,W)")
    shape = layer_input_shape(src, conv, input_shape)
    out = conv.spec.output_shape(shape)
    mask = opt.roi_mask(roi, out[1:])
    counts = region_form_counts(conv.name, conv.spec, shape, mask, conv.weight.dtype)
    if json_out:
        emit_json({"source": str(src.path), "roi": roi, **counts.to_dict()})
        return
    table = Table(title=f"Region form of {conv.name} (--roi {roi})", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    share = counts.positions / max(1, counts.total_positions)
    table.add_row("positions", f"{counts.positions} of {counts.total_positions} ({share:.1%})")
    table.add_row("matrix shape", f"{counts.rows} x {counts.cols}")
    table.add_row("nonzeros", f"{counts.nnz} ({human_count(counts.nnz)})")
    table.add_row("dense bytes", human_bytes(counts.dense_bytes))
    table.add_row("sparse bytes (CSR)", human_bytes(counts.csr_bytes))
    table.add_row(
        "MACs / sample",
        f"{human_count(counts.macs)} (full conv {human_count(counts.full_macs)})",
    )
    stdout().print(table)
