"""Write one layer's exact matrix `T` (and its bias `b`) to a file: refuse before any work.

The size checks (memory, disk) come first, with formulas from :mod:`convtool.sizes`; a dense
`.npy` is streamed in row blocks so it never needs all of `T` in memory; every file is written
atomically (:mod:`convtool.io.writers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from convtool import sizes
from convtool.errors import ConvtoolError
from convtool.io import matrix_files as mf
from convtool.io.source import ConvLayer
from convtool.io.writers import atomic_outputs, check_target
from convtool.matrices import MatrixInfo, bias_vector_for, dense_row_blocks, matrix
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
    bias = (
        bias_vector_for(conv.spec, conv.bias, input_shape, dtype) if conv.bias is not None else None
    )
    if fmt == "dense" and suffix == ".npy":
        rows, cols = info.shape
        block_rows = max(1, min(rows, BLOCK_BYTES // max(1, cols * info.itemsize)))
        blocks = dense_row_blocks(conv.spec, conv.weight, input_shape, block_rows)
        with atomic_outputs(paths, force=force, inputs=inputs) as temps:
            mf.write_npy_blocks(temps[0], info.shape, dtype, blocks, advance or (lambda n: None))
            _save_bias(temps, bias)
        return
    t = matrix(conv.spec, conv.weight, input_shape, sparse=fmt == "sparse", layout="csr")
    meta = {
        "layer": conv.name,
        "spec": conv.spec.describe(),
        "input_shape": list(input_shape),
        "output_shape": list(info.output_shape),
    }
    with atomic_outputs(paths, force=force, inputs=inputs) as temps:
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
        _save_bias(temps, bias)


def _save_bias(temps: list[Path], bias: torch.Tensor | None) -> None:
    if bias is not None and len(temps) > 1:
        np.save(temps[1], bias.numpy())
