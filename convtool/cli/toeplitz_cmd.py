"""`convtool toeplitz`: write the exact matrix of one conv layer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from convtool.cli import options as opt
from convtool.cli.app import app
from convtool.cli.progress import progress
from convtool.cli.shapes import layer_input_shape
from convtool.errors import ConvtoolError
from convtool.io import matrix_files as mf
from convtool.io.source import check_finite
from convtool.io.writers import atomic_outputs, check_target
from convtool.matrices import bias_vector_for, dense_row_blocks, matrix, matrix_info
from convtool.render.common import emit_json
from convtool.render.toeplitz import render_matrix_summary
from convtool.resources import check_disk, check_memory

_BLOCK_BYTES = 128 * 1024**2  # dense rows streamed to .npy per block


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
    )
    conv = src.select(layer)
    if not allow_nonfinite:
        check_finite(conv)
    shape = layer_input_shape(src, conv, input_shape)
    info = matrix_info(conv.spec, shape, conv.weight.dtype)
    result: dict[str, Any] = {"source": str(source), "name": conv.name, **info.to_dict()}
    result.update(format=fmt, outputs=[], seconds=0.0)

    if output is not None and fmt is not None:
        inputs = [p for p in (source, bias) if p is not None]
        sibling = mf.bias_sibling(output) if conv.bias is not None else None
        targets = [output] + ([sibling] if sibling is not None else [])
        for target in targets:  # before any work: a refusal costs nothing
            check_target(target, force, inputs)
        started = time.perf_counter()
        _write(output, fmt, conv, shape, info, targets, force, inputs, memory_limit, json_out)
        result.update(outputs=[str(t) for t in targets], seconds=time.perf_counter() - started)
    if plot is not None:
        from convtool.render.plots import plot_matrix

        title = f"{conv.name}: {conv.spec.describe()} on {shape}"
        with atomic_outputs([plot], force=force, inputs=[source]) as temps:
            result["plot"] = plot_matrix(temps[0], conv.spec, conv.weight, shape, title)
        result["outputs"] = [*result["outputs"], str(plot)]
    if json_out:
        emit_json(result)
    else:
        render_matrix_summary(result)


def _write(
    output: Path,
    fmt: str,
    conv: Any,
    shape: tuple[int, ...],
    info: Any,
    targets: list[Path],
    force: bool,
    inputs: list[Path],
    memory_limit: int | None,
    quiet: bool,
) -> None:
    suffix = output.suffix.lower()
    dtype = conv.weight.dtype
    rows, cols = info.shape
    what = f"a dense {rows} x {cols} {info.dtype} matrix"
    bias = bias_vector_for(conv.spec, conv.bias, shape, dtype) if conv.bias is not None else None
    if fmt == "dense" and suffix == ".npy":
        check_disk(output, info.dense_bytes, what, "use --sparse with .npz or .mtx")
        row_bytes = cols * info.itemsize
        check_memory(row_bytes, f"one row of {what}", "use --sparse", memory_limit)
        block_rows = max(1, min(rows, _BLOCK_BYTES // max(1, row_bytes)))
        blocks = dense_row_blocks(conv.spec, conv.weight, shape, block_rows)
        with atomic_outputs(targets, force=force, inputs=inputs) as temps:
            with progress(rows, "writing rows", not quiet) as advance:
                mf.write_npy_blocks(temps[0], info.shape, dtype, blocks, advance)
            if bias is not None:
                np.save(temps[1], bias.numpy())
        return
    if fmt == "dense":
        check_memory(
            info.dense_bytes,
            what,
            f"write {output.stem}.npy (streamed) or use --sparse",
            memory_limit,
        )
        check_disk(output, info.dense_bytes, what, "use --sparse")
    else:
        # indices + values while building, plus one copy while converting/saving
        need = 2 * info.nnz * (16 + info.itemsize) + 8 * (rows + 1)
        check_memory(
            need,
            f"a sparse matrix with {info.nnz} nonzeros",
            "use a smaller input shape",
            memory_limit,
        )
        check_disk(
            output,
            info.csr_bytes,
            f"a sparse matrix with {info.nnz} nonzeros",
            "use a smaller input shape",
        )
    t = matrix(conv.spec, conv.weight, shape, sparse=fmt == "sparse", layout="csr")
    meta = {
        "layer": conv.name,
        "spec": conv.spec.describe(),
        "input_shape": list(shape),
        "output_shape": list(info.output_shape),
    }
    with atomic_outputs(targets, force=force, inputs=inputs) as temps:
        if suffix == ".npz":
            mf.write_npz(temps[0], t, bias)
        elif suffix == ".mtx":
            mf.write_mtx(temps[0], t, comment=f" {conv.name}: {conv.spec.describe()}")
        elif suffix == ".pt":
            mf.write_pt(temps[0], t, bias, meta)
        elif suffix == ".safetensors":
            mf.write_safetensors(temps[0], t, bias, meta)
        else:  # pragma: no cover - matrix_format already refused it
            raise ConvtoolError(f"unsupported output {str(output)!r}")
        if bias is not None and len(temps) > 1:
            np.save(temps[1], bias.numpy())
