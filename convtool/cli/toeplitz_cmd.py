"""`convtool toeplitz`: write the exact matrix of one conv layer."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from convtool.cli import options as opt
from convtool.cli import shapes as sh
from convtool.cli.app import app
from convtool.cli.progress import progress
from convtool.describe import ToeplitzResult
from convtool.inventory import layer_info
from convtool.io import matrix_files as mf
from convtool.io.source import check_finite
from convtool.matrix_output import check_budget, targets, write_matrix
from convtool.render.common import emit_json
from convtool.render.toeplitz import render_matrix_summary


@app.command("toeplitz", no_args_is_help=True)
def toeplitz_command(
    source: opt.SourceArg,
    input_shape: opt.InputShapeOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output file; format by extension: .npy (dense, streamed), "
            ".npz (SciPy CSR), .mtx, .pt, .safetensors. Omit to only print the summary.",
        ),
    ] = None,
    sparse: Annotated[
        bool, typer.Option("--sparse", help="Build and write the sparse (CSR) matrix.")
    ] = False,
    force: opt.ForceOpt = False,
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
    allow_nonfinite: opt.AllowNonfiniteOpt = False,
    max_memory: opt.MaxMemoryOpt = None,
    forward_kwargs: opt.ForwardKwargsOpt = None,
    layer_input_shape: opt.LayerInputShapeOpt = None,
) -> None:
    """Write the exact matrix T of a conv layer: layer(x).flatten() == T @ x.flatten() + b.

    Example: convtool toeplitz kernel.npy --input-shape 3,7,9 -o T.npy
    """
    memory_limit = opt.max_memory(max_memory)
    fmt = mf.matrix_format(output, sparse) if output is not None else None
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
    conv = sh.pick_layer(src, layer, input_shape, layer_input_shape)
    if not allow_nonfinite:
        check_finite(conv)
    shape = sh.layer_input_shape(src, conv, input_shape, layer_input_shape)
    info = layer_info(conv, shape, conv.weight.dtype)
    result = ToeplitzResult(str(source), conv.name, info)
    if output is not None and fmt is not None:
        inputs = [p for p in (source, bias) if p is not None]
        paths = targets(output, conv, force, inputs)  # before any work: a refusal costs nothing
        check_budget(output, fmt, info, memory_limit)
        started = time.perf_counter()
        streamed = fmt == "dense" and output.suffix.lower() == ".npy"  # the only long write
        with progress(info.shape[0], "writing rows", streamed and not json_out) as advance:
            write_matrix(conv, shape, info, paths, fmt, force=force, inputs=inputs, advance=advance)
        result = replace(
            result,
            format=fmt,
            outputs=tuple(str(t) for t in paths),
            seconds=time.perf_counter() - started,
        )
    if json_out:
        emit_json(result.to_dict())
    else:
        render_matrix_summary(result)
