"""Write one layer's exact matrix `T` (and its bias `b`) to a file: refuse before any work.

The size checks (memory, disk) come first, with formulas from :mod:`convtool.sizes`; a dense
`.npy` is streamed in row blocks so it never needs all of `T` in memory; every file is written
atomically (:mod:`convtool.io.writers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convtool import sizes
from convtool.errors import ConvtoolError
from convtool.inventory import ConvLayer, layer_bias_vector, layer_matrix
from convtool.io import matrix_files as mf
from convtool.io.writers import atomic_outputs, check_target
from convtool.matrices import MatrixInfo, bias_vector_for, dense_row_blocks, matrix
from convtool.region import region_rows_for
from convtool.resources import check_disk, check_memory

BLOCK_BYTES = 128 * 1024**2  # dense rows streamed to .npy per block


def targets(output: Path, conv: ConvLayer, force: bool, inputs: Sequence[Path]) -> list[Path]:
    """The files a write of `conv`'s matrix to `output` makes, each checked before any work:
    the matrix, then (for a .npy with a bias) the bias sibling."""
    sibling = mf.bias_sibling(output) if conv.bias is not None else None
    paths = [output] + ([sibling] if sibling is not None else [])
    for path in paths:
        check_target(path, force, inputs)
    return paths


def check_budget(output: Path, fmt: str, info: MatrixInfo, max_memory: int | None = None) -> None:
    """Refuse (ConvtoolError, naming `sparse` / `max_memory`) a write that will not fit."""
    rows, cols = info.shape
    what = f"a dense {rows} x {cols} {info.dtype} matrix"
    if fmt == "dense" and output.suffix.lower() == ".npy":  # streamed: one row at a time
        check_disk(
            output, info.dense_bytes, what, "use sparse=True with .npz or .mtx", params=("sparse",)
        )
        row = sizes.dense_bytes(1, cols, info.itemsize)
        check_memory(row, f"one row of {what}", "use sparse=True", max_memory, params=("sparse",))
    elif fmt == "dense":
        check_memory(
            info.dense_bytes,
            what,
            f"write {output.stem}.npy (streamed) or use sparse=True",
            max_memory,
            params=("sparse",),
        )
        check_disk(output, info.dense_bytes, what, "use sparse=True", params=("sparse",))
    else:
        what = f"a sparse matrix with {info.nnz} nonzeros"
        need = sizes.sparse_build_bytes(info.nnz, rows, info.itemsize)
        check_memory(need, what, "use a smaller input shape", max_memory)
        check_disk(output, info.csr_bytes, what, "use a smaller input shape")


def write_matrix(
    conv: ConvLayer,
    input_shape: tuple[int, ...],
    info: MatrixInfo,
    paths: list[Path],
    fmt: str,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    advance: Callable[[int], None] | None = None,
) -> None:
    """Write `T` of `conv` on one sample of `input_shape` to `paths[0]` (format by its suffix)
    and, for a .npy, the bias to `paths[1]`. Call :func:`check_budget` first.

    Args:
        advance: called with the number of rows written, for a dense .npy (a progress bar).
    """
    output = paths[0]
    suffix = output.suffix.lower()
    dtype = conv.weight.dtype
    bias = layer_bias_vector(conv, input_shape, dtype) if conv.bias is not None else None
    if fmt == "dense" and suffix == ".npy" and conv.exact_spec:
        rows, cols = info.shape
        block_rows = max(1, min(rows, BLOCK_BYTES // max(1, cols * info.itemsize)))
        blocks = dense_row_blocks(conv.spec, conv.weight, input_shape, block_rows)
        with atomic_outputs(paths, force=force, inputs=inputs) as temps:
            mf.write_npy_blocks(temps[0], info.shape, dtype, blocks, advance or (lambda n: None))
            _save_bias(temps, bias)
        return
    # asymmetric (ONNX) pads or crops: T is a row/column subset of the unpadded conv's matrix
    t = layer_matrix(conv, input_shape, sparse=fmt == "sparse", layout="csr")
    meta = {
        "layer": conv.name,
        "spec": conv.spec.describe(),
        "input_shape": list(input_shape),
        "output_shape": list(info.output_shape),
    }
    with atomic_outputs(paths, force=force, inputs=inputs) as temps:
        # a padded or cropped layer: built whole, then saved
        _save_built(temps[0], t, bias, meta, f" {conv.name}: {conv.spec.describe()}", advance)
        _save_bias(temps, bias)


def _save_built(
    temp: Path,
    t: Tensor,
    bias: Tensor | None,
    meta: dict[str, Any],
    comment: str,
    advance: Callable[[int], None] | None = None,
) -> None:
    """A matrix already in memory, in the format of `temp`'s suffix."""
    suffix = temp.suffix.lower()
    if suffix == ".npy":
        rows, cols = t.shape
        mf.write_npy_blocks(temp, (rows, cols), t.dtype, [(0, t)], advance or (lambda n: None))
    elif suffix == ".npz":
        mf.write_npz(temp, t, bias)
    elif suffix == ".mtx":
        mf.write_mtx(temp, t, comment=comment)
    elif suffix == ".pt":
        mf.write_pt(temp, t, bias, meta)
    elif suffix == ".safetensors":
        mf.write_safetensors(temp, t, bias, meta)
    else:  # pragma: no cover - matrix_format already refused it
        raise ConvtoolError(f"unsupported output {str(temp)!r}")


def write_region(
    conv: ConvLayer,
    input_shape: tuple[int, ...],
    info: MatrixInfo,
    paths: list[Path],
    fmt: str,
    mask: Tensor,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    max_memory: int | None = None,
) -> None:
    """The rows of `T` at the output positions of `mask` (built directly, never from `T`) to
    `paths[0]`, for a .npy their bias to `paths[1]`, and their indices in the full `T` to
    `paths[-1]` (`NAME.rows.npy`). Call :func:`check_budget` first."""
    dtype = conv.weight.dtype
    rows, cols = info.shape
    if fmt == "dense":  # built whole in memory (check_budget checked one row for a .npy)
        what = f"a dense {rows} x {cols} {info.dtype} region matrix"
        check_memory(
            info.dense_bytes, what, "use sparse=True or a smaller region", max_memory,
            params=("sparse",),
        )  # fmt: skip
    row_index = region_rows_for(conv.spec, input_shape, mask)
    bias = None
    if conv.bias is not None:
        bias = bias_vector_for(conv.spec, conv.bias, input_shape, dtype)[row_index]
    t = matrix(
        conv.spec, conv.weight, input_shape, sparse=fmt == "sparse", layout="csr", rows=mask,
        max_memory=max_memory,
    )  # fmt: skip
    meta = {
        "layer": conv.name,
        "spec": conv.spec.describe(),
        "input_shape": list(input_shape),
        "output_shape": list(info.output_shape),
        "rows_file": paths[-1].name,  # indices of these rows in the full T
    }
    comment = f" {conv.name}: {conv.spec.describe()} region rows"
    with atomic_outputs(paths, force=force, inputs=inputs) as temps:
        _save_built(temps[0], t, bias, meta, comment)
        if bias is not None and len(temps) > 2:
            np.save(temps[1], bias.numpy())
        np.save(temps[-1], row_index.numpy())


def _save_bias(temps: list[Path], bias: torch.Tensor | None) -> None:
    if bias is not None and len(temps) > 1:
        np.save(temps[1], bias.numpy())
