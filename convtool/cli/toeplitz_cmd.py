"""`convtool toeplitz`: write the exact matrix of one conv layer."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from convtool.cli import options as opt
from convtool.cli import shapes as sh
from convtool.cli.app import app
from convtool.cli.progress import progress
from convtool.describe import ToeplitzResult
from convtool.errors import ConvtoolError
from convtool.inventory import layer_info
from convtool.io import matrix_files as mf
from convtool.io.writers import atomic_outputs, check_target
from convtool.matrix_output import check_budget, targets, write_matrix, write_region
from convtool.region import region_counts
from convtool.render.common import emit_json
from convtool.render.toeplitz import render_matrix_summary
from convtool.source import check_finite


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
    roi: opt.RoiOpt = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Write a PNG of T's block structure (entries when small, else a density image; "
            "needs matplotlib).",
        ),
    ] = None,
) -> None:
    """Write the exact matrix T of a conv layer: layer(x).flatten() == T @ x.flatten() + b.

    Example: convtool toeplitz kernel.npy --input-shape 3,7,9 -o T.npy
    (with --roi 1:3,0:4, only the rows of those output positions; their indices in the full T
    go to NAME.rows.npy).
    """
    memory_limit = opt.max_memory(max_memory)
    fmt = mf.matrix_format(output, sparse) if output is not None else None
    if plot is not None:
        from convtool.render.plots import require_matplotlib

        require_matplotlib()
        check_target(plot, force, [p for p in (source, bias) if p is not None])
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
    if plot is not None:  # refused before any work, not after the matrix was written
        from convtool.render.plots import require_matplotlib

        check_target(plot, force, [source])
        require_matplotlib()
    shape = sh.layer_input_shape(src, conv, input_shape, layer_input_shape)
    info = layer_info(conv, shape, conv.weight.dtype)
    mask = None
    region: dict[str, Any] | None = None
    if roi is not None:
        if not conv.exact_spec:
            raise ConvtoolError(
                f"--roi needs a layer that is one conv; {conv.name!r} pads its input unevenly "
                f"(an ONNX node with asymmetric pads)"
            )
        mask = opt.roi_mask(roi, info.output_shape[1:])
        counts = region_counts(conv.spec, shape, mask)
        info = replace(info, shape=(counts["rows"], counts["cols"]), nnz=counts["nnz"])
        region = {"roi": roi, "positions": counts["positions"], "macs": counts["macs"]}
    result = ToeplitzResult(str(source), conv.name, info)
    if output is not None and fmt is not None:
        inputs = [p for p in (source, bias) if p is not None]
        paths = targets(output, conv, force, inputs)  # before any work: a refusal costs nothing
        if mask is not None:
            paths.append(output.with_name(f"{output.stem}.rows.npy"))
            check_target(paths[-1], force, inputs)
        check_budget(output, fmt, info, memory_limit)
        started = time.perf_counter()
        if mask is not None:
            write_region(
                conv, shape, info, paths, fmt, mask, force=force, inputs=inputs,
                max_memory=memory_limit,
            )  # fmt: skip
        else:
            streamed = fmt == "dense" and output.suffix.lower() == ".npy"  # the only long write
            with progress(info.shape[0], "writing rows", streamed and not json_out) as advance:
                write_matrix(
                    conv, shape, info, paths, fmt, force=force, inputs=inputs, advance=advance
                )
        result = replace(
            result,
            format=fmt,
            outputs=tuple(str(t) for t in paths),
            seconds=time.perf_counter() - started,
        )
    extra: dict[str, Any] = {"region": region} if region is not None else {}
    if plot is not None:
        from convtool.render.plots import plot_matrix

        if not conv.exact_spec:
            raise ConvtoolError(
                f"--plot needs a layer that is one conv; {conv.name!r} pads its input unevenly "
                f"(an ONNX node with asymmetric pads)"
            )
        title = f"{conv.name}: {conv.spec.describe()} on {shape}"
        with atomic_outputs([plot], force=force, inputs=[source]) as temps:
            extra["plot"] = plot_matrix(temps[0], conv.spec, conv.weight, shape, title)
        result = replace(result, outputs=(*result.outputs, str(plot)))
    if json_out:
        emit_json({**result.to_dict(), **extra})
    else:
        render_matrix_summary(result)
