"""The LC, dense FC and sparse FC forms as ONNX subgraphs of standard ops.

Every emitter takes a tensor name holding `(N, *in_shape)` (any batch `N`) and returns the name
of `(N, *out_shape)`; weights become initializers. Only ops every runtime and converter knows are
used, so the forms survive tools that have no Conv:

- dense FC: ``Flatten -> Gemm(T, b, transB=1) -> Reshape``;
- sparse FC, *ELL* (every row padded to the longest row's nnz; a conv's rows hold at most
  `C_in/groups * prod(kernel)` taps, so the padding is small): ``Flatten -> Transpose ->
  Gather(cols) -> Mul(values) -> ReduceSum(row entries) -> Transpose -> Add(b) -> Reshape``;
- sparse FC, *scatter* (for irregular rows, where ELL would pad much): ``Flatten -> Transpose ->
  Gather(cols) -> Mul(values) -> ScatterND(reduction='add') -> Transpose -> Add(b)``;
- LC: ``Pad -> Flatten -> Transpose -> Gather(window indices) -> MatMul(per-position kernels)
  -> Transpose -> Reshape -> Add(b)``: one batched MatMul over (position, group).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ELL is chosen while its padded size stays within this factor of nnz.
ELL_SLACK = 1.25


@dataclass
class Builder:
    """Nodes and initializers added to a graph, with names that cannot clash.

    Attributes:
        prefix: put in front of every new name (unique per replaced node).
        nodes: the new NodeProtos, in order.
        initializers: the new TensorProtos.
    """

    prefix: str
    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    _count: int = 0

    def name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}/{what}_{self._count}"

    def const(self, what: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(what)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], what: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(what or op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs)
        )
        return out

    def flatten(self, x: str) -> str:
        return self.op("Flatten", [x], axis=1)

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        """`(N, ...) -> (N, *shape)` for any N."""
        return self.op("Reshape", [x, self.const("shape", np.array([-1, *shape], np.int64))])


def _np(t: Any, dtype: Any) -> np.ndarray:
    """A torch tensor or array as a numpy array of `dtype`."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t, dtype=dtype)


def dense_fc(
    b: Builder, x: str, matrix: Any, bias: Any | None, out_shape: Sequence[int], dtype: Any
) -> str:
    """`T x + b` with `T` dense `(out, in)`: one Gemm."""
    t = _np(matrix, dtype)
    inputs = [b.flatten(x), b.const("T", t)]
    if bias is not None:
        inputs.append(b.const("b", _np(bias, dtype).reshape(-1)))
    y = b.op("Gemm", inputs, transB=1)
    return b.reshape(y, out_shape)


def coo_parts(matrix: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(rows, cols, values, shape) of a torch sparse (COO/CSR) or scipy matrix, row-major."""
    if hasattr(matrix, "layout"):  # torch
        coo = matrix.detach().cpu().to_sparse_coo().coalesce()
        rows, cols = (i.numpy() for i in coo.indices())
        values = coo.values().numpy()
        shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    else:  # scipy.sparse
        coo = matrix.tocoo()
        order = np.lexsort((coo.col, coo.row))
        rows, cols, values = coo.row[order], coo.col[order], coo.data[order]
        shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    return rows.astype(np.int64), cols.astype(np.int64), values, shape


def ell_width(rows: np.ndarray, n_rows: int) -> int:
    """Entries of the longest row (the ELL width)."""
    return int(np.bincount(rows, minlength=n_rows).max()) if rows.size else 1


def sparse_form(rows: np.ndarray, n_rows: int, form: str = "auto") -> str:
    """'ell' or 'scatter' for a sparse matrix: ELL unless it would pad a lot."""
    if form != "auto":
        return form
    return "ell" if n_rows * ell_width(rows, n_rows) <= ELL_SLACK * max(rows.size, 1) else "scatter"


def sparse_fc(
    b: Builder,
    x: str,
    matrix: Any,
    bias: Any | None,
    out_shape: Sequence[int],
    dtype: Any,
    form: str = "auto",
) -> str:
    """`T x + b` with `T` sparse, as gathers, a product and a per-row sum (see module doc)."""
    rows, cols, values, (n_out, n_in) = coo_parts(matrix)
    values = np.asarray(values, dtype=dtype)
    flat = b.flatten(x)
    if sparse_form(rows, n_out, form) == "ell":
        width = ell_width(rows, n_out)
        counts = np.bincount(rows, minlength=n_out)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(rows.size) - starts[rows]  # rows are sorted: position within the row
        idx = np.zeros((n_out, width), np.int64)
        val = np.zeros((n_out, width), dtype)
        idx[rows, slot], val[rows, slot] = cols, values
        # Gathering whole rows of the transposed input copies contiguous batches: much faster
        # in onnxruntime than gathering along axis 1 of (N, in) once N is more than a few.
        xt = b.op("Transpose", [flat], perm=[1, 0])  # (in, N)
        taps = b.op("Gather", [xt, b.const("cols", idx)], axis=0)  # (out, width, N)
        prod = b.op("Mul", [taps, b.const("values", val[:, :, None])])
        summed = b.op("ReduceSum", [prod, b.const("axes", np.array([1], np.int64))], keepdims=0)
        y = b.op("Transpose", [summed], perm=[1, 0])
    else:
        xt = b.op("Transpose", [flat], perm=[1, 0])  # (in, N)
        taps = b.op("Gather", [xt, b.const("cols", cols)], axis=0)  # (nnz, N)
        prod = b.op("Mul", [taps, b.const("values", values.reshape(-1, 1))])
        batch = b.op("Shape", [xt], start=1, end=2)
        size = b.op("Concat", [b.const("rows", np.array([n_out], np.int64)), batch], axis=0)
        zero = np.zeros(1, dtype)
        from onnx import numpy_helper

        zeros = b.op("ConstantOfShape", [size], value=numpy_helper.from_array(zero))
        summed = b.op(
            "ScatterND", [zeros, b.const("rows", rows.reshape(-1, 1)), prod], reduction="add"
        )
        y = b.op("Transpose", [summed], perm=[1, 0])
    if bias is not None:
        y = b.op("Add", [y, b.const("b", _np(bias, dtype).reshape(-1))])
    del n_in
    return b.reshape(y, out_shape)


@dataclass(frozen=True)
class Window:
    """A plain (zero-padded) conv's geometry, as ONNX's Conv attributes give it.

    Attributes:
        in_shape: one input sample `(C_in, *spatial)`.
        kernel, stride, dilation: per spatial dim.
        pads: ONNX order, `(begin_1, ..., begin_d, end_1, ..., end_d)`.
        groups: channel groups.
    """

    in_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int

    @property
    def padded(self) -> tuple[int, ...]:
        d = len(self.kernel)
        return tuple(n + self.pads[i] + self.pads[i + d] for i, n in enumerate(self.in_shape[1:]))

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            (p - dl * (k - 1) - 1) // s + 1
            for p, k, s, dl in zip(
                self.padded, self.kernel, self.stride, self.dilation, strict=True
            )
        )

    def indices(self) -> np.ndarray:
        """`(P, G, C_in/G * K)`: flat index in the padded input of every tap of every window."""
        out, padded = self.out_spatial, self.padded
        d = len(out)
        pos = np.indices(out).reshape(d, -1)  # (d, P)
        taps = np.indices(self.kernel).reshape(d, -1)  # (d, K)
        coords = (
            pos[:, :, None] * np.array(self.stride)[:, None, None]
            + taps[:, None, :] * np.array(self.dilation)[:, None, None]
        )
        spatial = np.ravel_multi_index(tuple(coords), padded)  # (P, K)
        cin_g = self.in_shape[0] // self.groups
        channels = np.arange(self.in_shape[0]).reshape(self.groups, cin_g)
        idx = channels[None, :, :, None] * math.prod(padded) + spatial[:, None, None, :]
        return idx.reshape(spatial.shape[0], self.groups, -1).astype(np.int64)


def locally_connected(
    b: Builder, x: str, window: Window, weight: Any, bias: Any | None, dtype: Any
) -> str:
    """The conv as an LC layer: every output position gets its own copy of the kernel.

    Args:
        weight: the conv kernel `(C_out, C_in/G, *kernel)`; copied once per output position
            (the stored LC weight is `(P, G, C_out/G, C_in/G * K)`).
        bias: `(C_out,)`, stored per position as `(C_out, *out_spatial)`, or None.
    """
    w = _np(weight, dtype)
    c_out, g = w.shape[0], window.groups
    out = window.out_spatial
    positions = math.prod(out)
    kernels = w.reshape(g, c_out // g, -1)
    per_position = np.ascontiguousarray(np.broadcast_to(kernels, (positions, *kernels.shape)))
    d = len(out)
    if any(window.pads):
        pads = np.array([0, 0, *window.pads[:d], 0, 0, *window.pads[d:]], np.int64)
        x = b.op("Pad", [x, b.const("pads", pads)], mode="constant")
    xt = b.op("Transpose", [b.flatten(x)], perm=[1, 0])  # (C_in * prod(padded), N)
    cols = b.op("Gather", [xt, b.const("windows", window.indices())], axis=0)  # (P, G, CgK, N)
    y = b.op("MatMul", [b.const("kernels", per_position), cols])  # (P, G, C_out/G, N)
    y = b.op("Transpose", [y], perm=[3, 1, 2, 0])  # (N, G, C_out/G, P)
    y = b.reshape(y, (c_out, *out))
    if bias is not None:
        full = np.broadcast_to(_np(bias, dtype).reshape(-1, *(1,) * d), (c_out, *out))
        y = b.op("Add", [y, b.const("b", np.ascontiguousarray(full))])
    return y


def lc_bytes(window: Window, c_out: int, itemsize: int, bias: bool) -> int:
    """Bytes the LC form stores: per-position kernels, window indices, per-position bias."""
    positions = math.prod(window.out_spatial)
    taps = window.in_shape[0] // window.groups * math.prod(window.kernel)
    return positions * (c_out * taps * itemsize + window.groups * taps * 8) + (
        c_out * positions * itemsize if bias else 0
    )
