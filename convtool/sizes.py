"""Every byte and entry formula in one place: how big a form is, before anyone builds it.

Sparse matrices use int64 indices (torch's sparse tensors and the CSR files convtool writes), so
an index costs `INDEX_BYTES`. Each function is plain integer arithmetic on counts that
:mod:`convtool.matrices` (`matrix_shape`, `structural_nnz`) and :mod:`convtool.spec` compute; the
budget checks that use them live in :mod:`convtool.resources`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

INDEX_BYTES = 8  # int64 row/column indices and row pointers

__all__ = [
    "INDEX_BYTES",
    "coo_bytes",
    "csr_bytes",
    "dense_bytes",
    "itemsize",
    "lc_entries",
    "sparse_build_bytes",
]


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype` (float32 -> 4)."""
    return torch.empty((), dtype=dtype).element_size()


def dense_bytes(rows: int, cols: int, item: int) -> int:
    """A dense `(rows, cols)` matrix."""
    return rows * cols * item


def csr_bytes(nnz: int, rows: int, item: int) -> int:
    """CSR: values + int64 column indices + int64 row pointers."""
    return nnz * (item + INDEX_BYTES) + (rows + 1) * INDEX_BYTES


def coo_bytes(nnz: int, item: int, sparse_dims: int = 2) -> int:
    """COO: values + one int64 index per sparse dim per entry."""
    return nnz * (item + sparse_dims * INDEX_BYTES)


def sparse_build_bytes(nnz: int, rows: int, item: int) -> int:
    """Peak while building a CSR `T` and handing it on: the COO indices and values while
    building, one more copy while converting to CSR or saving, and the row pointers."""
    return 2 * coo_bytes(nnz, item) + (rows + 1) * INDEX_BYTES


def lc_entries(out_channels: int, out_spatial: Sequence[int], taps: int, bias: bool = True) -> int:
    """Entries of a locally-connected layer: one kernel of `taps` (`C_in / groups * prod(k)`)
    per output position, plus one bias per output position."""
    positions = out_channels * math.prod(out_spatial)
    return positions * taps + (positions if bias else 0)
