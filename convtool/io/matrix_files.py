"""Writing a matrix `T` and its bias vector in the format the file extension names."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convtool.errors import ConvtoolError

# extension -> (what it can hold, description)
MATRIX_FORMATS: dict[str, tuple[str, str]] = {
    ".npy": ("dense", "NumPy array, written in row blocks through a memory map"),
    ".npz": ("sparse", "SciPy sparse CSR (scipy.sparse.load_npz), bias under 'bias'"),
    ".mtx": ("sparse", "Matrix Market coordinate format"),
    ".pt": ("both", "torch.save dict: 'matrix' (dense or sparse CSR), 'bias'"),
    ".safetensors": ("both", "'matrix' (dense) or 'matrix.crow_indices/col_indices/values'"),
}


def matrix_format(path: Path, sparse: bool) -> str:
    """'dense' or 'sparse': what will be written to `path`; refuses unknown/unfit extensions."""
    suffix = path.suffix.lower()
    if suffix not in MATRIX_FORMATS:
        raise ConvtoolError(
            f"cannot tell the output format of {str(path)!r}; use one of "
            f"{', '.join(MATRIX_FORMATS)}"
        )
    holds = MATRIX_FORMATS[suffix][0]
    if holds == "dense" and sparse:
        raise ConvtoolError(
            f"{suffix} holds a dense matrix; for sparse=True write .npz, .mtx, .pt or .safetensors",
            params=("sparse",),
        )
    if holds == "sparse":
        return "sparse"
    return "sparse" if sparse else "dense"


def bias_sibling(path: Path) -> Path | None:
    """Where the bias goes when the matrix file cannot hold it: 'T.npy' -> 'T.bias.npy'."""
    if path.suffix.lower() in (".npy", ".mtx"):
        return path.with_name(f"{path.stem}.bias.npy")
    return None


def write_npy_blocks(
    path: Path,
    shape: tuple[int, int],
    dtype: torch.dtype,
    blocks: Iterable[tuple[int, Tensor]],
    advance: Callable[[int], None] | None = None,
) -> None:
    """Stream `(first_row, block)` pairs into a .npy file through a memory map."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
    try:
        for r0, block in blocks:
            out[r0 : r0 + block.shape[0]] = block.numpy()
            if advance is not None:
                advance(block.shape[0])
        out.flush()
    finally:
        del out


def _csr_parts(matrix: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    csr = matrix if matrix.layout == torch.sparse_csr else matrix.to_sparse_csr()
    return (
        csr.crow_indices().numpy(),
        csr.col_indices().numpy(),
        csr.values().detach().numpy(),
    )


def write_npz(path: Path, matrix: Tensor, bias: Tensor | None) -> None:
    """SciPy's save_npz layout (so scipy.sparse.load_npz reads it) plus a 'bias' array."""
    indptr, indices, data = _csr_parts(matrix)
    arrays: dict[str, Any] = {
        "indices": indices,
        "indptr": indptr,
        "format": np.array(b"csr"),
        "shape": np.array(matrix.shape),
        "data": data,
    }
    if bias is not None:
        arrays["bias"] = bias.detach().numpy()
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)


def write_mtx(path: Path, matrix: Tensor, comment: str) -> None:
    """Matrix Market coordinate file of a sparse matrix."""
    import scipy.io
    import scipy.sparse

    indptr, indices, data = _csr_parts(matrix)
    csr = scipy.sparse.csr_matrix((data, indices, indptr), shape=tuple(matrix.shape))
    with path.open("wb") as f:
        scipy.io.mmwrite(f, csr, comment=comment)


def write_pt(path: Path, matrix: Tensor, bias: Tensor | None, meta: dict[str, Any]) -> None:
    """torch.save of plain tensors and strings: loads with torch.load(weights_only=True)."""
    if matrix.layout not in (torch.strided, torch.sparse_csr):
        matrix = matrix.to_sparse_csr()
    payload: dict[str, Any] = {"matrix": matrix.detach(), "meta": json.dumps(meta)}
    if bias is not None:
        payload["bias"] = bias.detach()
    torch.save(payload, path)


def write_safetensors(
    path: Path, matrix: Tensor, bias: Tensor | None, meta: dict[str, Any]
) -> None:
    """Dense: 'matrix'. Sparse: CSR components 'matrix.crow_indices', '.col_indices', '.values'."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    if matrix.layout == torch.strided:
        tensors["matrix"] = matrix.detach().contiguous()
    else:
        csr = matrix if matrix.layout == torch.sparse_csr else matrix.to_sparse_csr()
        tensors["matrix.crow_indices"] = csr.crow_indices().contiguous()
        tensors["matrix.col_indices"] = csr.col_indices().contiguous()
        tensors["matrix.values"] = csr.values().detach().contiguous()
    if bias is not None:
        tensors["bias"] = bias.detach().contiguous()
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata["format"] = "dense" if matrix.layout == torch.strided else "csr"
    save_file(tensors, str(path), metadata=metadata)
