"""Trainable layers for the LC and FC forms of a conv.

* :class:`LocallyConnected1d` / :class:`LocallyConnected2d` / :class:`LocallyConnected3d`: a conv
  without weight sharing. Each output position has its own kernel (and bias), read over the same
  window of the (padded) input as the conv reads.
* :class:`FullyConnected`: `y = T x + b` on one flattened sample, with `T` dense (trainable like
  `nn.Linear`) or torch-sparse (a fixed buffer).

How the LC layer is computed (numbers in ``benchmarks/layers.py``): the input is padded once
with `F.pad` (in the padding mode) and transposed to `(C_in, *padded, N)`; then, a few output
rows at a time (so they stay in cache), the windows of those rows are built and multiplied with
the per-position kernels as batched matrix products, one block per (position, group). How the
windows are built depends on the batch (see :class:`_LocallyConnectedFunction`):

* N=1: gathered with cached indices (`index_select`, about 0.7 ns per number against 1.15 for
  strided copies of 3-number kernel rows) into unit-stride row vectors, which `torch.bmm`
  multiplies at the speed of reading the weights (it is about 2x slower on a vector with
  ambiguous strides). The forward is then about 1.4x one read of the weights.
* large batches (N >= 32): gathered the same way as rows of N numbers; the input gradient goes
  back with `index_add_` on the same indices (2.5 ms against 3.7 for one slab add per kernel
  tap at N=64, 16->32, 32x32).
* small batches: tap-major windows `(C_in, *kernel, positions, N)`, copied as one shifted slab
  of the input per tap (long unit-stride runs, where a position-major copy moves runs of N) and
  added back the same way; the products read each block with a row stride.

The backward is written out (:class:`_LocallyConnectedFunction`): autograd's own would hand
`bmm` gradients with no unit stride, which it multiplies one matrix at a time, and undo the
windows with `unfold_backward`. The weight gradient is numpy's stacked matmul (up to 1.5x faster
than `torch.bmm` on these small blocks) and is written into the previous step's array once
nothing holds it any more (:func:`_buffer`): a fresh array above glibc's mmap threshold costs
page faults at every step. At N=64 the three products take about as long as the whole conv
step; the transposes between the `(N, C, *spatial)` layout and the per-position blocks, the
window gathers (twice: forward and backward) and the input-gradient scatter make up the rest.
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from convtool.errors import ConvtoolError
from convtool.spec import ConvSpec

__all__ = [
    "FullyConnected",
    "LocallyConnected1d",
    "LocallyConnected2d",
    "LocallyConnected3d",
]

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)
# Batch size up to which the LC input gradient uses the (positions, N, taps) product layout.
_SMALL_BATCH = 16
# Batch size from which the LC gathers its windows as rows of N numbers (position-major, where
# the products run fastest); below it, tap-major slabs (cheaper to copy and to add back when
# rows are short).
_ROW_BATCH = 32


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _size_tuple(value: Any, ndim: int, name: str) -> tuple[int, ...]:
    """An int or a sequence of `ndim` positive ints, as a tuple."""
    items = (value,) * ndim if isinstance(value, int) else value
    if (
        isinstance(value, bool)
        or not isinstance(items, Sequence)
        or isinstance(items, str)
        or len(items) != ndim
        or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in items)
    ):
        raise ConvtoolError(f"{name} must be a positive int or a tuple of {ndim}, got {value!r}")
    return tuple(items)


def _check_input(x: Tensor, sample: tuple[int, ...], dtype: torch.dtype, name: str) -> bool:
    """Validate `x` against one sample's shape; returns True when it is batched."""
    if not isinstance(x, Tensor):
        raise ConvtoolError(f"{name} expects a tensor, got {type(x).__name__}")
    batched = x.dim() == len(sample) + 1
    if tuple(x.shape[int(batched) :]) != sample or x.dim() not in (len(sample), len(sample) + 1):
        raise ConvtoolError(
            f"{name} expects input (N, {_shape_str(sample)[1:-1]}) or {_shape_str(sample)}, "
            f"got {_shape_str(x.shape)}"
        )
    if x.dtype != dtype:
        raise ConvtoolError(
            f"{name} has dtype {dtype} but the input is {x.dtype}; convert one with .to()"
        )
    return batched


# ---------------------------------------------------------------------------------------------
# Locally-connected


def _transpose(t: Tensor, rows: int) -> Tensor:
    """`t` read as a `(rows, -1)` matrix, transposed into a contiguous `(-1, rows)` one.

    PyTorch copies a 2-d transpose tile by tile, several times faster than the general permutes
    it replaces here (moving the batch dim to the end and back).
    """
    return t.reshape(rows, -1).t().contiguous()


def _eager(*tensors: Tensor) -> bool:
    """True when nothing is being traced or compiled and every tensor is an ordinary one (not
    a tracer's fake or functional wrapper)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return all(type(t) in (Tensor, nn.Parameter) for t in tensors)


def _plain_cpu(*tensors: Tensor) -> bool:
    """True when every tensor is an ordinary float32/float64 CPU tensor and nothing is being
    traced or compiled: numpy may then compute on it (a tracer would not see numpy's work)."""
    return _eager(*tensors) and all(
        t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.float64)
        and not t.is_conj()
        and not t.is_neg()
        for t in tensors
    )


def _blas_layout(t: Tensor) -> bool:
    """True when each matrix of `t (..., R, C)` is a BLAS operand as it lies (one of its last
    two strides 1, the other at least the row length): numpy's stacked matmul then calls BLAS
    per block; on other layouts it falls back to a loop far slower than `torch.bmm`."""
    rs, cs = t.stride(-2), t.stride(-1)
    return (cs == 1 and rs >= max(1, t.shape[-1])) or (rs == 1 and cs >= max(1, t.shape[-2]))


def _matmuls(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """`a (..., R, K) @ b (..., K, M)` -> `(..., R, M)` (into `out`, which may be a strided view,
    if given): one matrix product per block, over one or more batch dims.

    For ordinary CPU tensors whose blocks are BLAS matrices as they lie (`out`'s too) this is
    numpy's stacked matmul, which calls BLAS once per block with little overhead and writes
    into `out` in place, whatever its batch strides: at `R = 1` (vector-matrix products) about
    the time to read `b`; on the small blocks of a locally-connected layer up to 1.5x faster
    than `torch.bmm`, which also cannot write into a strided `out`. Otherwise torch.
    """
    if (
        not _plain_cpu(a, b)
        or a.dtype != b.dtype
        or not (_blas_layout(a) and _blas_layout(b))
        or (out is not None and (out.dtype != a.dtype or not _blas_layout(out)))
    ):
        if a.dim() == 3 and (out is None or out.is_contiguous()):
            return torch.bmm(a, b, out=out)
        if out is None:
            return torch.matmul(a, b)
        return out.copy_(torch.matmul(a, b))
    if out is None:
        out = torch.empty((*a.shape[:-1], b.shape[-1]), dtype=a.dtype)
    np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.detach().numpy())
    return out


# Bytes of windows (or of their gradient) handled at a time: small enough to stay in cache and
# to be reused by the allocator, instead of a fresh (page-faulting) array the size of all of them.
_CHUNK_BYTES = 1 << 19


def _row_chunks(out_sp: tuple[int, ...], per_position: int) -> list[tuple[int, int]]:
    """Ranges of rows (first output axis) whose windows take about `_CHUNK_BYTES`."""
    rows = out_sp[0]
    if type(per_position) is not int or torch.compiler.is_compiling():
        # a symbolic size (torch.export with a dynamic batch): one chunk, so the exported
        # program holds no guard on the batch size
        return [(0, rows)]
    step = max(1, _CHUNK_BYTES // max(1, per_position * math.prod(out_sp[1:])))
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]


def _window_view(
    xt: Tensor,
    rows: tuple[int, int],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:
    """The windows of output rows `rows` (first axis) as a view of `xt (C_in, *padded, N)`:
    `(C_in, *out_rows, N, *kernel)`, no copy."""
    lo, hi = rows
    span = (hi - lo - 1) * stride[0] + dilation[0] * (kernel[0] - 1) + 1
    win = xt.narrow(1, lo * stride[0], span)
    for axis in range(len(kernel)):
        win = win.unfold(axis + 1, dilation[axis] * (kernel[axis] - 1) + 1, stride[axis])
    if any(d > 1 for d in dilation):
        every: tuple[Any, ...] = (..., *(slice(None, None, d) for d in dilation))
        win = win[every]
    return win


def _windows(
    xt: Tensor,
    rows: tuple[int, int],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """Windows of output rows `rows` (first axis) of the transposed padded input.

    `xt (C_in, *padded, N)` -> `(P_rows*G, C_in/g*K, N)`, ordered like the weight's positions.
    """
    ndim = len(kernel)
    c_in, n = xt.shape[0], xt.shape[-1]
    win = _window_view(xt, rows, kernel, stride, dilation)
    # (C_in, *out, N, *k) -> (*out, G, C_in/g, *k, N) -> (P*G, C_in/g*K, N): one copy.
    win = win.unflatten(0, (groups, c_in // groups))
    perm = (*range(2, ndim + 2), 0, 1, *range(ndim + 3, 2 * ndim + 3), ndim + 2)
    win = win.permute(perm)
    if n == 1 and ndim > 1:
        # One copy per first-axis tap: each moves whole kernel rows, about twice as fast as
        # the one copy (which would otherwise rival the matrix-vector products).
        cols = xt.new_empty(win.shape)
        for tap in range(kernel[0]):
            cols.select(ndim + 2, tap).copy_(win.select(ndim + 2, tap))
        return cols.view(-1, (c_in // groups) * math.prod(kernel), 1)
    return win.reshape(-1, (c_in // groups) * math.prod(kernel), n)


@functools.lru_cache(maxsize=32)
def _window_rows(
    c_in: int,
    padded: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    rows: int,
) -> Tensor:
    """Where the windows of the first `rows` output rows (first axis) read the input.

    Returns flat indices into one padded sample `(C_in, *padded)`, ordered like the weight:
    `(rows, *out[1:], G, C_in/g, *kernel)` flattened. Windows are translation invariant, so
    the same indices serve every later row chunk read from an input shifted by the chunk's first
    row (the forward reads them from the input's rows past that row's start); only the first
    chunk's worth is built.
    """
    ndim = len(kernel)
    span = (rows - 1) * stride[0] + dilation[0] * (kernel[0] - 1) + 1
    win = torch.arange(c_in * math.prod(padded)).view(c_in, *padded).narrow(1, 0, span)
    for axis in range(ndim):
        win = win.unfold(axis + 1, dilation[axis] * (kernel[axis] - 1) + 1, stride[axis])
    every: tuple[Any, ...] = (..., *(slice(None, None, d) for d in dilation))
    win = win[every].unflatten(0, (groups, c_in // groups))  # (G, C_in/g, *out, *k)
    return win.permute(*range(2, ndim + 2), 0, 1, *range(ndim + 2, 2 * ndim + 2)).flatten()


def _tap_windows(
    xt: Tensor,
    rows: tuple[int, int],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    out: Tensor,
) -> Tensor:
    """Windows of output rows `rows` of `xt (C_in, *padded, N)`, tap-major, copied into the
    start of the flat buffer `out`.

    Returns that part of `out` viewed as `(C_in, *kernel, P_rows, N)`: for each input channel
    and kernel tap, the input samples that tap reads at every position of the chunk, one
    shifted slab of the input each. One copy moves runs of `W_out * N` numbers (stride 1), where a
    position-major layout would move runs of `kernel[-1]` or `N`. Position `p`'s window (the
    rows of one group) is then a `(C_in/g * K, N)` matrix with row stride `P_rows * N`, a BLAS
    operand as it lies.
    """
    ndim = len(kernel)
    c_in, n = xt.shape[0], xt.shape[-1]
    win = _window_view(xt, rows, kernel, stride, dilation)
    # (C_in, *out, N, *k) -> (C_in, *k, *out, N)
    win = win.permute(0, *range(ndim + 2, 2 * ndim + 2), *range(1, ndim + 2))
    out = out[: win.numel()].view(win.shape)
    out.copy_(win)
    return out.view(c_in, *kernel, -1, n)


def _tap_col2im(
    gxs: Tensor,
    gcols: Tensor,
    rows: tuple[int, int],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    out_sp: tuple[int, ...],
) -> None:
    """Adds tap-major window gradients `gcols (C_in, *kernel, P_rows, N)` of output rows `rows`
    back into `gxs (C_in, *padded, N)`: one add per kernel tap, of a whole slab (the inverse of
    :func:`_tap_windows`)."""
    ndim = len(stride)
    kernel = tuple(gcols.shape[1 : ndim + 1])
    lo, hi = rows
    chunk_sp = (hi - lo, *out_sp[1:])
    slabs = gcols.view(*gcols.shape[: ndim + 1], *chunk_sp, gcols.shape[-1])
    for tap in itertools.product(*(range(k) for k in kernel)):
        window: tuple[Any, ...] = tuple(
            slice(t * d + a * s, t * d + s * (a + o - 1) + 1, s)
            for t, d, s, o, a in zip(
                tap, dilation, stride, chunk_sp, (lo,) + (0,) * (ndim - 1), strict=True
            )
        )
        at: tuple[Any, ...] = (slice(None), *tap)
        gxs[(slice(None), *window)].add_(slabs[at])


# Arrays reused from one step to the next, per weight and slot (the LC keeps only its weight
# gradient: keeping its activation-sized temporaries too saved 2-4% of the 2-D step and nothing
# in 3-D, not worth three activation-sized arrays held per layer between steps). A fresh array
# above glibc's mmap threshold (32 MiB at most) is page-faulted in at every use: a fresh 36 MiB
# weight gradient took 12 ms against 1.7 ms to write it, twice the whole step of the 3-D conv
# in benchmarks/layers.py. Training that drops its gradients (`zero_grad(set_to_none=True)`)
# then writes into the same pages at every step. Keyed by `id(weight)`, with a weak reference
# that drops the entry when the weight dies (a WeakKeyDictionary would compare tensors with
# `==`).
_BUFFERS: dict[int, tuple[weakref.ref[Tensor], dict[str, Tensor]]] = {}
# How many references a storage has (private; without it buffers are never reused).
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _buffer(weight: Tensor, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised `(shape)` array (dtype and device of `like`) kept with `weight` under
    `slot`, reusing the previous one when no tensor but the cache's own refers to its storage
    any more (a gradient handed out earlier, or an input still saved for a backward, is never
    overwritten)."""
    if not (_plain_cpu(weight) and _plain_cpu(like)):
        return like.new_empty(shape)
    key = id(weight)
    entry = _BUFFERS.get(key)
    if entry is None or entry[0]() is not weight:
        entry = (weakref.ref(weight, lambda _: _BUFFERS.pop(key, None)), {})
        _BUFFERS[key] = entry
    buf = entry[1].get(slot)
    # Two references when free: the cached tensor's and the temporary storage object's.
    if (
        buf is not None
        and tuple(buf.shape) == shape
        and buf.dtype == like.dtype
        and _use_count is not None
        and _use_count(buf.untyped_storage()._cdata) <= 2
    ):
        return buf
    buf = like.new_empty(shape)
    entry[1][slot] = buf
    return buf


def _weight_grad_buffer(weight: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialised `(shape)` array for the gradient of `weight` (see :func:`_buffer`)."""
    return _buffer(weight, "grad", shape, weight)


class _LocallyConnectedFunction(torch.autograd.Function):
    """LC product on a padded input, with a hand-written backward.

    Inputs: `xp (N, C_in, *padded)`, `weight (*out, C_out, C_in/g, *kernel)`, `bias
    (C_out, *out)` or None, and the geometry `(kernel, stride, dilation, groups)`.
    Output: `(N, C_out, *out)`, contiguous.

    With `P` positions, `G` groups and `K` kernel taps: the input is transposed once to
    `(C_in, *padded, N)`. Then, a few output rows at a time (:data:`_CHUNK_BYTES`), the windows
    of those rows are built and the forward and both gradients are one batched matmul each over
    the per-position blocks; the input gradient is put back into the input's layout. The windows
    are laid out three ways, by case (all eager, i.e. not traced):

    * `N = 1`: gathered with cached indices (:func:`_window_rows`, `index_select`) into
      `(P_rows*G, 1, C_in/g*K)`: unit-stride row vectors that `torch.bmm` multiplies at the
      speed of reading the kernels. The backward uses the traced path's layout below.
    * `N >=` :data:`_ROW_BATCH`: gathered the same way as rows of `N` numbers into
      `(P_rows*G, C_in/g*K, N)`; the input gradient is put back with `index_add_` on the same
      indices.
    * otherwise tap-major (:func:`_tap_windows`): `(C_in, *kernel, P_rows, N)`, one slab copy
      per chunk and one slab add per tap back (:func:`_tap_col2im`); the products read each
      block with a row stride, through numpy's stacked matmul.

    Traced or compiled calls copy position-major windows with chained `Tensor.unfold` (one copy
    per chunk) and put the input gradient back with one strided add per kernel tap. The backward
    copies the windows again rather than keeping them all (keeping the 33 MiB of windows of the
    N=64 case in benchmarks/layers.py made the step 10% slower: the products then read them
    from memory instead of cache).
    """

    @staticmethod
    def forward(
        ctx: Any,
        xp: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> Tensor:
        ndim = len(kernel)
        n, c_in, padded = xp.shape[0], xp.shape[1], tuple(xp.shape[2:])
        has_bias = bias is not None
        out_sp = tuple(weight.shape[:ndim])
        c_out = weight.shape[ndim]
        batch, cout_g = math.prod(out_sp) * groups, c_out // groups
        per_row = batch // out_sp[0]  # blocks per row of the first output axis

        eager = _eager(xp, weight)
        xt = _transpose(xp, n).view(c_in, *padded, n)
        mat = weight.reshape(batch, cout_g, -1)
        rows = None
        if bias is not None and n > 1 and not eager:
            rows = bias.reshape(c_out, -1).t().reshape(batch, 1, cout_g)
        # Chunks write into one array; tracers (torch.export) refuse out= on tensors that
        # require grad, so they get a concatenation instead.
        y = xp.new_empty(batch, n, cout_g) if eager else None
        parts = []
        per_position = groups * mat.shape[2] * n * xp.element_size()
        chunks = _row_chunks(out_sp, per_position)
        step = chunks[0][1]  # rows in the first (largest) chunk
        if y is not None and n == 1:
            # Matrix-vector products: stream the weights once, no weight-sized temporary (the
            # bias is added to the output below). The windows are gathered with precomputed
            # indices (`index_select`: about 0.7 ns per number, where strided copies of
            # 3-number kernel rows take 1.15) into `(P_rows*G, 1, C_in/g*K)`: each block a
            # unit-stride row vector, which `torch.bmm` multiplies at the speed of reading the
            # kernels (twice that when the vector's strides are ambiguous, as a transposed
            # column's are).
            index = _window_rows(c_in, padded, kernel, stride, dilation, groups, step)
            index = index.to(xt.device)
            flat, plane = xt.view(-1), stride[0] * math.prod(padded[1:])
            buf = xp.new_empty(index.numel())
            for lo, hi in chunks:
                part = slice(lo * per_row, hi * per_row)
                size = (hi - lo) * per_row * mat.shape[2]
                cols = torch.index_select(flat[lo * plane :], 0, index[:size], out=buf[:size])
                a = cols.view(-1, 1, mat.shape[2])
                torch.bmm(a, mat[part].transpose(1, 2), out=y[part])
        elif y is not None and n >= _ROW_BATCH:
            # Windows gathered as rows of N numbers into `(P_rows*G, C_in/g*K, N)`.
            index = _window_rows(c_in, padded, kernel, stride, dilation, groups, step)
            index = index.to(xt.device)
            rows2d, plane = xt.view(-1, n), stride[0] * math.prod(padded[1:])
            buf = xp.new_empty(index.numel(), n)
            for lo, hi in chunks:
                part = slice(lo * per_row, hi * per_row)
                size = (hi - lo) * per_row * mat.shape[2]
                cols = torch.index_select(rows2d[lo * plane :], 0, index[:size], out=buf[:size])
                a = cols.view(-1, mat.shape[2], n).transpose(1, 2)
                torch.bmm(a, mat[part].transpose(1, 2), out=y[part])
        elif y is not None:
            # Tap-major windows (see _tap_windows): cheap to copy and to add back; the
            # products read them with a row stride (numpy's stacked matmul on plain CPU
            # tensors, torch otherwise). Bias added to the output below.
            cin_g, k = c_in // groups, math.prod(kernel)
            buf = xp.new_empty(step * per_row * mat.shape[2] * n)
            for lo, hi in chunks:
                part = slice(lo * per_row, hi * per_row)
                taps = _tap_windows(xt, (lo, hi), kernel, stride, dilation, buf)
                # (G, C_in/g*K, P_rows, N) -> (P_rows, G, N, C_in/g*K)
                a = taps.view(groups, cin_g * k, -1, n).permute(2, 0, 3, 1)
                b = mat[part].view(-1, groups, cout_g, cin_g * k).transpose(2, 3)
                _matmuls(a, b, out=y[part].view(-1, groups, n, cout_g))
        else:
            for lo, hi in chunks:
                cols = _windows(xt, (lo, hi), kernel, stride, dilation, groups)
                part = slice(lo * per_row, hi * per_row)
                if rows is None:
                    parts.append(torch.bmm(cols.transpose(1, 2), mat[part].transpose(1, 2)))
                else:
                    a, b = cols.transpose(1, 2), mat[part].transpose(1, 2)
                    parts.append(torch.baddbmm(rows[part], a, b))
        if y is None:
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
        # y: (P*G, N, C_out/g) -> (N, C_out, *out)
        if groups == 1:
            out = _transpose(y, batch).view(n, c_out, *out_sp)
        else:
            out = y.view(-1, groups, n, cout_g).permute(2, 1, 3, 0).contiguous()
            out = out.view(n, c_out, *out_sp)
        if bias is not None and rows is None:
            out = out.add_(bias)

        # The input is only needed again for the weight gradient (its windows are recopied).
        ctx.save_for_backward(xt if ctx.needs_input_grad[1] else None, weight)
        ctx.geometry = (padded, kernel, stride, dilation, groups, has_bias)
        return out

    @staticmethod
    @once_differentiable  # the saved input carries no graph back to itself
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xt, weight = ctx.saved_tensors
        padded, kernel, stride, dilation, groups, has_bias = ctx.geometry
        ndim = len(kernel)
        n = grad.shape[0]
        out_sp = tuple(weight.shape[:ndim])
        c_out, cin_g = weight.shape[ndim], weight.shape[ndim + 1]
        batch, cout_g = math.prod(out_sp) * groups, c_out // groups
        per_row = batch // out_sp[0]

        # (N, C_out, *out) -> (P*G, N, C_out/g); with one group a chunk at a time, in cache
        # (see forward).
        g2d = grad.reshape(n * c_out, batch) if groups == 1 and _eager(grad) else None
        gy = gbuf = None
        if g2d is None:
            if groups == 1:
                gy = _transpose(grad, n * c_out).view(batch, n, cout_g)
            else:
                gy = grad.reshape(n, groups, cout_g, -1).permute(3, 1, 0, 2).contiguous()
                gy = gy.view(batch, n, cout_g)
        mat = weight.reshape(batch, cout_g, -1)
        grad_x = grad_w = grad_b = None
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        want_w, want_x = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        if want_w:
            grad_w = _weight_grad_buffer(weight, tuple(mat.shape))
        gxs = grad.new_zeros(groups, cin_g, *padded, n) if want_x else None
        small = n <= _SMALL_BATCH
        kg = mat.shape[2]
        per_position = groups * kg * n * grad.element_size()
        chunks = _row_chunks(out_sp, per_position) if want_w or want_x else []
        # Tap-major windows and window gradients (see forward) where nothing is traced; at N=1
        # the position-major products below (outer products, vector-matrix products).
        tapped = n > 1 and bool(chunks) and _eager(grad, weight) and (xt is None or _eager(xt))
        gathered = tapped and n >= _ROW_BATCH
        if tapped:
            size = chunks[0][1] * per_row * kg * n
            wbuf = grad.new_empty(size) if want_w else None
            xbuf = grad.new_empty(size) if want_x else None
        if gathered:
            c_in, step = groups * cin_g, chunks[0][1]
            index = _window_rows(c_in, padded, kernel, stride, dilation, groups, step)
            index = index.to(grad.device)
            plane = stride[0] * math.prod(padded[1:])
        for lo, hi in chunks:
            part = slice(lo * per_row, hi * per_row)
            if g2d is not None:
                if gbuf is None:  # the first chunk is the largest
                    gbuf = grad.new_empty((hi - lo) * per_row, n * c_out)
                gy_part = gbuf[: (hi - lo) * per_row]
                gy_part.copy_(g2d[:, part].t())
                gy_part = gy_part.view(-1, n, cout_g)
            else:
                assert gy is not None
                gy_part = gy[part]
            if gathered:
                rows = slice(lo * plane, None)
                size = (hi - lo) * per_row * kg
                if grad_w is not None:
                    assert wbuf is not None and xt is not None
                    cols = wbuf[: size * n].view(size, n)
                    torch.index_select(xt.view(-1, n)[rows], 0, index[:size], out=cols)
                    a = gy_part.transpose(1, 2)
                    _matmuls(a, cols.view(-1, kg, n).transpose(1, 2), out=grad_w[part])
                if gxs is not None:
                    assert xbuf is not None
                    gcols = xbuf[: size * n].view(-1, kg, n)
                    torch.bmm(mat[part].transpose(1, 2), gy_part.transpose(1, 2), out=gcols)
                    gxs.view(-1, n)[rows].index_add_(0, index[:size], gcols.view(size, n))
                continue
            if tapped:
                # (P_rows, G, C_out/g, N): the output gradient of each block, transposed
                gyt = gy_part.view(-1, groups, n, cout_g).transpose(2, 3)
                count = (hi - lo) * per_row * kg * n
                if grad_w is not None:
                    assert wbuf is not None
                    slabs = _tap_windows(xt, (lo, hi), kernel, stride, dilation, wbuf[:count])
                    b = slabs.view(groups, kg, -1, n).permute(2, 0, 3, 1)
                    _matmuls(gyt, b, out=grad_w[part].view(-1, groups, cout_g, kg))
                if gxs is not None:
                    assert xbuf is not None
                    gtaps = xbuf[:count].view(groups, kg, -1, n)
                    a = mat[part].view(-1, groups, cout_g, kg).transpose(2, 3)
                    _matmuls(a, gyt, out=gtaps.permute(2, 0, 1, 3))
                    _tap_col2im(
                        gxs.view(-1, *padded, n),
                        gtaps.view(groups * cin_g, *kernel, -1, n),
                        (lo, hi),
                        stride,
                        dilation,
                        out_sp,
                    )
                continue
            if grad_w is not None:
                cols = _windows(xt, (lo, hi), kernel, stride, dilation, groups)
                if n == 1:  # outer products
                    torch.mul(gy_part.transpose(1, 2), cols.transpose(1, 2), out=grad_w[part])
                else:
                    _matmuls(gy_part.transpose(1, 2), cols.transpose(1, 2), out=grad_w[part])
            if gxs is None:
                continue
            chunk_sp = (hi - lo, *out_sp[1:])
            if small:
                # bmm writes (P*G, N, C_in/g*K) several times faster than its transpose when
                # N is small; the tap loop below then reads N with a stride instead.
                # At N=1 these are vector-matrix products (see _matmuls).
                prod = _matmuls if n == 1 else torch.bmm
                gcols = prod(gy_part, mat[part]).view(*chunk_sp, groups, n, cin_g, *kernel)
                to_dest = (ndim, ndim + 2, *range(ndim), ndim + 1)
            else:
                gcols = torch.bmm(mat[part].transpose(1, 2), gy_part.transpose(1, 2))
                gcols = gcols.view(*chunk_sp, groups, cin_g, *kernel, n)
                to_dest = (ndim, ndim + 1, *range(ndim), ndim + 2)
            lead = ndim + 3 if small else ndim + 2
            # Undo the windows: one strided add per kernel tap (not per position).
            for tap in itertools.product(*(range(k) for k in kernel)):
                window: tuple[Any, ...] = tuple(
                    slice(t * d + a * s, t * d + s * (a + o - 1) + 1, s)
                    for t, d, s, o, a in zip(
                        tap, dilation, stride, chunk_sp, (lo,) + (0,) * (ndim - 1), strict=True
                    )
                )
                taps: tuple[Any, ...] = (*(slice(None),) * lead, *tap)
                gxs[(slice(None), slice(None), *window)].add_(gcols[taps].permute(to_dest))
        if grad_w is not None:
            grad_w = grad_w.view(weight.shape)
        if gxs is not None:
            grad_x = _transpose(gxs, gxs.numel() // n).view(n, groups * cin_g, *padded)
        return grad_x, grad_w, grad_b, None, None, None, None


class _LocallyConnectedNd(nn.Module):
    """Shared implementation of :class:`LocallyConnected1d`, ``2d`` and ``3d``.

    A locally-connected layer computes what a conv with the same hyperparameters computes, except
    that every output position `o` has its own kernel `weight[o]` and its own bias `bias[:, o]`:
    `y[n, co, o] = bias[co, o] + sum_{ci, k} weight[o, co, ci, k] * x_padded[n, g*C_in/g + ci,
    o * stride + k * dilation]`, with `g` the group of `co` (`o` and `k` are multi-indices).

    Args:
        in_channels: `C_in`.
        out_channels: `C_out`.
        input_size: spatial input size, `(L,)`, `(H, W)` or `(D, H, W)` (an int broadcasts).
            The layer only accepts inputs of this size.
        kernel_size, stride, padding, dilation, groups, padding_mode: as in `nn.Conv*d`;
            `padding` may be 'same' or 'valid'. Non-zero padding modes pad with `F.pad` in that
            mode, as `nn.Conv*d` does.
        bias: whether to learn a bias per output channel and position.
        device, dtype: of the parameters.

    Attributes:
        weight: `(*out_spatial, C_out, C_in/groups, *kernel_size)`: `weight[o]` is the kernel
            at output position `o`, laid out like a conv weight.
        bias: `(C_out, *out_spatial)` or None.
        spec: the :class:`~convtool.spec.ConvSpec` of the conv with the same hyperparameters.
        input_size, output_size: spatial sizes in and out.

    Shape:
        Input `(N, C_in, *input_size)` or unbatched `(C_in, *input_size)`;
        output `(N, C_out, *output_size)` or `(C_out, *output_size)`.

    Raises:
        ConvtoolError: for invalid hyperparameters, or an input of the wrong shape or dtype.
    """

    _ndim: ClassVar[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        input_size: int | Sequence[int],
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        spec = ConvSpec.create(
            self._ndim,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            bias=bias,
        )
        self.spec = spec
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = spec.kernel_size, spec.stride, spec.dilation
        self.padding, self.padding_mode = spec.padding, padding_mode
        self.input_size = _size_tuple(input_size, self._ndim, "input_size")
        self.output_size = spec.output_shape((in_channels, *self.input_size))[1:]
        # F.pad wants (last-dim before, last-dim after, previous dim ...).
        self._pad = tuple(p for pair in reversed(spec.pad_pairs) for p in pair)

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(
                *self.output_size,
                out_channels,
                in_channels // groups,
                *spec.kernel_size,
                **factory,
            )
        )
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`nn.Conv*d`'s init per position: kaiming-uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in))."""
        bound = 1.0 / math.sqrt((self.in_channels // self.groups) * self.spec.kernel_numel)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """`(N, C_in, *input_size)` or `(C_in, *input_size)` -> `(N, C_out, *output_size)`."""
        sample = (self.in_channels, *self.input_size)
        batched = _check_input(x, sample, self.weight.dtype, type(self).__name__)
        if not batched:
            x = x.unsqueeze(0)
        if any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        out = _LocallyConnectedFunction.apply(
            x, self.weight, self.bias, self.kernel_size, self.stride, self.dilation, self.groups
        )
        return out if batched else out.squeeze(0)

    # ------------------------------------------------------------------ weight views
    def kernels(self) -> Tensor:
        """Per-position kernels `(*output_size, C_out, C_in/groups, *kernel)`: :attr:`weight`.

        Kept as a method so code does not depend on how the weight is stored.
        """
        return self.weight

    def shared_kernel(self) -> Tensor:
        """The mean kernel over positions, shaped like a conv weight `(C_out, C_in/g, *kernel)`."""
        return self.kernels().mean(dim=tuple(range(self._ndim)))

    @torch.no_grad()
    def sharing_distance(self) -> float:
        """How far the per-position kernels are from sharing one kernel.

        `||W - W_mean||_F / ||W_mean||_F` with both sides over all positions (`W_mean` repeated):
        0 for a layer from :func:`~convtool.convert.to_locally_connected`, about 1 when the
        per-position differences are as large as the shared part (inf if the mean is zero but
        the kernels are not). Biases are not included.
        """
        mean = self.weight.mean(dim=tuple(range(self._ndim)))
        spread = torch.linalg.vector_norm(self.weight - mean).item()
        scale = torch.linalg.vector_norm(mean).item() * math.sqrt(math.prod(self.output_size))
        if spread == 0.0:
            return 0.0
        return spread / scale if scale > 0.0 else math.inf

    @torch.no_grad()
    def to_conv(self) -> nn.Module:
        """Project onto weight sharing: an `nn.Conv*d` with the mean kernel and mean bias.

        Exact inverse of :func:`~convtool.convert.to_locally_connected` when the kernels are
        still shared (the mean of equal kernels is that kernel).
        """
        conv_type: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self._ndim - 1]
        conv = conv_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        conv.weight.copy_(self.shared_kernel())
        if self.bias is not None and conv.bias is not None:
            conv.bias.copy_(self.bias.mean(dim=tuple(range(1, self._ndim + 1))))
        return conv

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}",
            f"input_size={self.input_size}",
            f"output_size={self.output_size}",
            f"kernel_size={self.kernel_size}",
            f"stride={self.stride}",
        ]
        if self.padding != (0,) * self._ndim:
            parts.append(f"padding={self.padding!r}")
        if self.dilation != (1,) * self._ndim:
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        return ", ".join(parts)


class LocallyConnected1d(_LocallyConnectedNd):
    """1-d locally-connected layer: input `(N, C_in, L)`; see :class:`_LocallyConnectedNd`."""

    _ndim = 1


class LocallyConnected2d(_LocallyConnectedNd):
    """2-d locally-connected layer: input `(N, C_in, H, W)`; see :class:`_LocallyConnectedNd`."""

    _ndim = 2


class LocallyConnected3d(_LocallyConnectedNd):
    """3-d locally-connected layer: input `(N, C_in, D, H, W)`; see :class:`_LocallyConnectedNd`."""

    _ndim = 3


# ---------------------------------------------------------------------------------------------
# Fully-connected


def _alias(v: Tensor) -> Tensor:
    """A tensor on `v`'s storage that is not a view of `v` (no `_base`)."""
    out = torch.empty(0, dtype=v.dtype, device=v.device)
    with torch.no_grad():
        return out.set_(v.untyped_storage(), v.storage_offset(), v.size(), v.stride())


def _exporting() -> bool:
    """True under torch.export / torch.compile, `torch.onnx.export` or TorchScript tracing."""
    return bool(
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
    )


class FullyConnected(nn.Module):
    """`y = T x + b` on one flattened sample, reshaped back: a conv as a matrix.

    Dense `T` is an `nn.Parameter` `weight` of shape `(out_features, in_features)` with an
    `nn.Parameter` `bias` `(out_features,)`, trainable like `nn.Linear`. Sparse `T` (torch COO or
    CSR) is a *buffer* `weight`: its pattern and values are fixed, gradients flow to the input
    and the bias only (train the dense form, or an LC layer, to learn `T`). CSR multiplies much
    faster than COO on CPU. A `state_dict` loads into a module built with the same arguments.

    Sparse `T` is kept out of `_buffers` (it still goes through `.to()` and `state_dict` under
    the key `weight`) because torch.export cannot take a sparse tensor as program state. Under
    torch.export / `torch.onnx.export` / TorchScript tracing the forward computes the same
    product from dense COO views of `T` (gather the input at the column indices, multiply by
    the values, `scatter_add` per row), which export to standard ops and to `.pt2`. The views
    share `T`'s storage; only CSR needs its row indices expanded (one int32 per non-zero).

    Args:
        in_shape: one input sample, e.g. `(C_in, H, W)`; `in_features = prod(in_shape)`.
        out_shape: one output sample, e.g. `(C_out, H_out, W_out)`.
        matrix: `T`, `(out_features, in_features)`, dense or torch sparse (COO or CSR). It is
            copied (COO is coalesced) unless `copy=False`.
        bias: `(out_features,)` or None for no bias.
        copy: False to take `matrix` itself (dense: as the parameter's storage) when nothing
            else holds it; a clone of a large `T` doubles the peak memory for nothing.

    Shape:
        Input `(N, *in_shape)` or `in_shape`; output `(N, *out_shape)` or `out_shape`.

    Raises:
        ConvtoolError: if the shapes do not match, or for an input of the wrong shape or dtype.
    """

    # sparse form only: COO views of T for the exportable forward (see _set_sparse)
    _rows: Tensor
    _cols: Tensor
    _values: Tensor

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        matrix: Tensor,
        bias: Tensor | None = None,
        *,
        copy: bool = True,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        self.in_features, self.out_features = math.prod(self.in_shape), math.prod(self.out_shape)
        if tuple(matrix.shape) != (self.out_features, self.in_features):
            raise ConvtoolError(
                f"matrix has shape {_shape_str(matrix.shape)} but in_shape "
                f"{_shape_str(self.in_shape)} and out_shape {_shape_str(self.out_shape)} need "
                f"({self.out_features}, {self.in_features})"
            )
        if not matrix.is_floating_point():
            raise ConvtoolError(f"matrix must be floating point, got dtype {matrix.dtype}")
        self.sparse = matrix.layout in _SPARSE_LAYOUTS
        if not self.sparse and matrix.layout != torch.strided:
            raise ConvtoolError(
                f"matrix layout must be strided, sparse_coo or sparse_csr, got {matrix.layout}"
            )
        # a list hides sparse T from torch.export, which lifts every tensor attribute
        self._sparse_box: list[Tensor] = []
        if self.sparse:
            t = matrix.detach()
            if t.layout == torch.sparse_coo:
                t = t.coalesce()
            elif copy:
                t = t.clone()
            self._set_sparse(t)
        else:
            self.weight = nn.Parameter(matrix.detach().clone() if copy else matrix.detach())
        self.bias: nn.Parameter | None
        if bias is None:
            self.register_parameter("bias", None)
        else:
            if tuple(bias.shape) != (self.out_features,):
                raise ConvtoolError(
                    f"bias has shape {_shape_str(bias.shape)}, expected ({self.out_features},)"
                )
            self.bias = nn.Parameter(bias.detach().to(matrix.dtype).clone())

    @property
    def weight(self) -> Tensor:
        """`T`, `(out_features, in_features)`: the dense parameter or the sparse tensor."""
        if self._sparse_box:
            return self._sparse_box[0]
        try:
            return self._parameters["weight"]  # type: ignore[return-value]
        except KeyError:  # before __init__ registers it: lets register_parameter proceed
            raise AttributeError("weight") from None

    @weight.setter
    def weight(self, value: Tensor) -> None:
        if isinstance(value, nn.Parameter) or not self.sparse:
            self.register_parameter("weight", value)  # type: ignore[arg-type]
        else:
            self._set_sparse(value)

    def _set_sparse(self, t: Tensor) -> None:
        """Hold sparse `t` as `T` and derive the COO views the exportable forward reads."""
        if t.layout not in _SPARSE_LAYOUTS or tuple(t.shape) != (
            self.out_features,
            self.in_features,
        ):
            raise ConvtoolError(
                f"a sparse FullyConnected needs a sparse ({self.out_features}, "
                f"{self.in_features}) weight, got {t.layout} {_shape_str(t.shape)}"
            )
        if t.layout == torch.sparse_coo and not t.is_coalesced():
            t = t.coalesce()
        self._sparse_box = [t]
        if t.layout == torch.sparse_coo:
            index = t.indices()
            rows, cols = index[0], index[1]
        else:  # CSR has no per-entry row index: the one extra array
            # int32 when it fits: 4 bytes per non-zero; the export path widens it in the graph
            crow = t.crow_indices()
            small = self.out_features < 2**31
            rows = torch.repeat_interleave(
                torch.arange(
                    self.out_features,
                    device=crow.device,
                    dtype=torch.int32 if small else torch.int64,
                ),
                crow.diff(),
                output_size=t.values().numel(),
            )
            cols = t.col_indices()
        # non-persistent buffers that alias T's storage without being views of T (export
        # would otherwise follow the view to the sparse base)
        for name, v in (("_rows", rows), ("_cols", cols), ("_values", t.values())):
            self.register_buffer(name, _alias(v), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> FullyConnected:
        super()._apply(fn, recurse)
        if self._sparse_box:  # the buffers were converted on their own: re-alias them
            with torch.no_grad():
                self._set_sparse(fn(self._sparse_box[0]))
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        box = self.__dict__.get("_sparse_box")
        if box:  # copy.deepcopy copied the buffers on their own: re-alias them
            self._set_sparse(box[0])

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._sparse_box:
            t = self._sparse_box[0]
            destination[prefix + "weight"] = t if keep_vars else t.detach()
            if prefix + "bias" in destination and hasattr(destination, "move_to_end"):
                destination.move_to_end(prefix + "bias")

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not self._sparse_box:
            return
        key = prefix + "weight"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        value = state_dict[key]
        own = self._sparse_box[0]
        if not isinstance(value, Tensor) or value.layout != own.layout:
            error_msgs.append(f"{key}: expected a {own.layout} tensor")
        elif tuple(value.shape) != tuple(own.shape):
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                f"the shape in current model is {tuple(own.shape)}"
            )
        else:
            self._set_sparse(value.detach().to(own.device, own.dtype).clone())

    @property
    def layout(self) -> str:
        """'dense', 'coo' or 'csr'."""
        return {torch.sparse_coo: "coo", torch.sparse_csr: "csr"}.get(self.weight.layout, "dense")

    def forward(self, x: Tensor) -> Tensor:
        """`(N, *in_shape)` or `in_shape` -> `(N, *out_shape)` or `out_shape`."""
        batched = _check_input(x, self.in_shape, self.weight.dtype, "FullyConnected")
        flat = x.reshape(-1, self.in_features)
        if self.sparse and _exporting():
            rows, cols, values = self._rows, self._cols, self._values
            n = flat.shape[0]
            taps = flat[:, cols] * values
            start = flat.new_zeros(n, self.out_features)
            if self.bias is not None:
                start = start + self.bias
            # scatter_add, not index_add: the TorchScript-based ONNX exporter writes index_add
            # as a plain ScatterND (duplicate rows overwrite); scatter_add becomes
            # ScatterElements(reduction="add") in both exporters
            y = start.scatter_add(1, rows.long().expand(n, -1), taps)
        elif self.sparse:
            # (out, in) @ (in, N); the transposed operand is what the sparse kernels prefer.
            y = torch.sparse.mm(self.weight, flat.t()).t()
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(flat, self.weight, self.bias)
        return y.reshape(-1, *self.out_shape) if batched else y.reshape(self.out_shape)

    def extra_repr(self) -> str:
        return (
            f"in_shape={self.in_shape}, out_shape={self.out_shape}, layout={self.layout!r}, "
            f"bias={self.bias is not None}"
        )
