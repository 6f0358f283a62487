"""Entry counts of `T` in closed form, and the memory each form needs, checked before building.

Everything here is Python-int arithmetic on a :class:`~convtool.spec.ConvSpec` and one sample
shape: no tensor over output positions is ever allocated, so counting a layer costs the same
for a 3x3 input as for a 10^8 x 10^8 one.

Per axis (input size `n`, output size `m`, kernel `k`, stride `s`, dilation `d`, padding
before `lo`), output position `o` and tap `j` read padded position `o*s + j*d - lo`. The
counts of the whole matrix are products of per-axis counts (see :func:`structural_nnz`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from convtool.errors import ConvtoolError
from convtool.resources import check_memory
from convtool.spec import ConvSpec

INDEX_BYTES = 8  # int64 indices
# Bytes per template entry while it is built: rows, cols and source indices (int64) plus the
# mask / sort intermediates of the index arithmetic.
TEMPLATE_ENTRY_BYTES = 5 * INDEX_BYTES
_CHUNK = 1 << 16  # border output positions handled per numpy pass


# ---------------------------------------------------------------------------- per-axis counts
def _floor_sum(n: int, m: int, a: int, b: int) -> int:
    """`sum(floor((a*i + b) / m) for i in range(n))` for n, a, b >= 0, m >= 1 (AtCoder's)."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b = divmod(y_max, m)
        m, a = a, m


def _below(y: int, s: int, d: int) -> int:
    """`#{(o, j) >= 0 : o*s + j*d <= y}`."""
    if y < 0:
        return 0
    count = y // s + 1
    return count + _floor_sum(count, d, s, y - (count - 1) * s)


def _in_box(x: int, m: int, k: int, s: int, d: int) -> int:
    """`#{(o, j) in [0, m) x [0, k) : o*s + j*d <= x}` by inclusion-exclusion."""
    return (
        _below(x, s, d)
        - _below(x - m * s, s, d)
        - _below(x - k * d, s, d)
        + _below(x - m * s - k * d, s, d)
    )


def axis_taps(n: int, m: int, k: int, s: int, d: int, lo: int, mode: str) -> int:
    """(output position, tap) pairs along one axis whose tap reads a real input value.

    With zero padding a tap on the padding reads a constant 0 and does not count; the other
    modes copy real values into the padding, so every tap counts.
    """
    if mode != "zeros":
        return m * k
    return _in_box(lo + n - 1, m, k, s, d) - _in_box(lo - 1, m, k, s, d)


def axis_distinct(n: int, m: int, k: int, s: int, d: int, lo: int, mode: str) -> int:
    """Distinct (output position, input index) pairs along one axis after the padding map.

    Zeros: the taps that read input (all distinct). Circular: `min(k, n / gcd(d, n))` per
    output position (an arithmetic progression mod n). Replicate and reflect fold taps onto the
    edges only for output positions whose taps leave the input; those border positions are
    counted in numpy chunks, the interior ones (`k` each) in closed form.
    """
    if mode == "zeros":
        return axis_taps(n, m, k, s, d, lo, mode)
    if mode == "circular":
        return m * min(k, n // math.gcd(d, n))
    if mode not in ("replicate", "reflect"):
        raise ConvtoolError(f"unknown padding_mode {mode!r}")
    if n == 1:  # every tap lands on the one input value
        return m
    span = (k - 1) * d
    # interior: lo <= o*s and o*s + span <= n - 1 + lo
    first = min(m, -(-lo // s))
    last = min(m - 1, (n - 1 + lo - span) // s) if n - 1 + lo - span >= 0 else -1
    interior = max(0, last - first + 1)
    total = interior * k
    borders = [(0, first)]
    borders.append((max(first, last + 1), m))
    per_o = _replicate_counts if mode == "replicate" else _reflect_counts
    for start, stop in borders:
        for c0 in range(start, stop, _CHUNK):
            o = np.arange(c0, min(stop, c0 + _CHUNK), dtype=object if n > 2**30 else np.int64)
            total += int(per_o(o * s - lo, n, k, d).sum())
    return total


def _replicate_counts(c: np.ndarray, n: int, k: int, d: int) -> np.ndarray:
    """Distinct clamped values of `c + j*d`, `j < k`, for each start `c` (n >= 2)."""
    j_lo = np.maximum(0, -(c // d))  # first j with c + j*d >= 0
    j_hi = np.minimum(k - 1, (n - 1 - c) // d)  # last j with c + j*d <= n - 1
    inside = np.maximum(0, j_hi - j_lo + 1)
    hits_zero = (c <= 0) & ((-c) % d == 0) & ((-c) // d < k)
    last = c + (k - 1) * d
    hits_top = (c <= n - 1) & (last >= n - 1) & ((n - 1 - c) % d == 0)
    low = (c < 0) & ~hits_zero
    high = (last > n - 1) & ~hits_top
    return inside + low.astype(inside.dtype) + high.astype(inside.dtype)


def _reflect_counts(c: np.ndarray, n: int, k: int, d: int) -> np.ndarray:
    """Distinct reflected values of `c + j*d`, `j < k`, for each start `c` (n >= 2).

    PyTorch's reflect (pad < n, one bounce) is `x -> fold(x mod P)`, `P = 2(n - 1)`, which
    identifies `x` and `-x` mod P. So the count is the number of classes {x, -x} the residues
    `c + t*d` (t < k) meet: they walk the coset `c + gZ` (g = gcd(d, P)) of L = P/g elements,
    and negation maps step t to step `u - t` (mod L) where `u*d = -2c` (mod P).
    """
    p = 2 * (n - 1)
    g = math.gcd(d, p)
    cyc = p // g
    same = (2 * c) % g == 0  # the coset is closed under negation
    c_mod = c % p
    if k >= cyc:  # every residue of the coset is reached
        fixed = sum(((c_mod - x) % g == 0).astype(np.int64) for x in (0, p // 2))
        return np.where(same, (cyc + fixed) // 2, cyc)
    inv = pow(d // g, -1, cyc) if cyc > 1 else 0
    u = (((-2 * c_mod) % p) // g) % cyc * inv % cyc
    lo_end = u - k + 1  # the steps u - t for t < k cover [u - k + 1, u]
    overlap = np.maximum(0, np.minimum(u, k - 1) - np.maximum(lo_end, 0) + 1) + np.maximum(
        0, np.minimum(u, -cyc + k - 1) - np.maximum(lo_end, -cyc) + 1
    )
    if cyc % 2:
        t0 = u * ((cyc + 1) // 2) % cyc
        fixed = (t0 < k).astype(np.int64)
    else:
        half = u // 2
        fixed = ((u % 2 == 0) & (half < k)).astype(np.int64) + (
            (u % 2 == 0) & (half + cyc // 2 < k)
        ).astype(np.int64)
    return np.where(same, k - (overlap - fixed) // 2, k)


# ---------------------------------------------------------------------------- whole matrix
def _forward_axes(
    spec: ConvSpec, sample: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """(input spatial, output spatial, rows channels, cols channels) of the forward conv whose
    matrix (or its transpose, for a transposed conv) is `T`."""
    out = spec.output_shape(sample)
    if spec.transposed:
        return out[1:], sample[1:], spec.in_channels, spec.out_channels
    return sample[1:], out[1:], spec.out_channels, spec.in_channels


def _count(spec: ConvSpec, input_shape: Sequence[int], distinct: bool) -> int:
    sample = spec.sample_shape(input_shape)
    in_sp, out_sp, c_rows, c_cols = _forward_axes(spec, sample)
    mode = "zeros" if spec.transposed else spec.padding_mode
    count = c_rows * (c_cols // spec.groups)
    per_axis = axis_distinct if distinct else axis_taps
    for axis, (lo, _) in enumerate(spec.pad_pairs):
        count *= per_axis(
            in_sp[axis],
            out_sp[axis],
            spec.kernel_size[axis],
            spec.stride[axis],
            spec.dilation[axis],
            lo,
            mode,
        )
    return count


def structural_nnz(spec: ConvSpec, input_shape: Sequence[int]) -> int:
    """Structural non-zeros of `T`, without building it.

    A tap lands on column `(ci, i_1, ..., i_D)`; two taps of one row coincide exactly when every
    per-axis index does, so the distinct (row, col) pairs factor over the axes.
    """
    return _count(spec, input_shape, distinct=True)


def tap_count(spec: ConvSpec, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one sample through the conv: taps that read a real input value.

    Taps on zero padding do not count (so with zero padding this is :func:`structural_nnz`);
    with reflect/replicate/circular padding every tap reads a copied value and counts, so it can
    exceed the non-zeros, where coinciding taps are merged.
    """
    return _count(spec, input_shape, distinct=False)


def template_entries(spec: ConvSpec, sample: tuple[int, ...]) -> int:
    """Entries of the index template shared by all output channels (before padding taps are
    dropped): forward output positions x input channels per group x kernel taps."""
    _, out_sp, _, c_cols = _forward_axes(spec, sample)
    return math.prod(out_sp) * (c_cols // spec.groups) * spec.kernel_numel


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------- checks
def matrix_bytes(spec: ConvSpec, sample: tuple[int, ...], dtype: torch.dtype, sparse: bool) -> int:
    """Peak bytes of building `T` (dense, or sparse with int64 indices), template included."""
    rows = math.prod(spec.output_shape(sample))
    cols = math.prod(sample)
    size = itemsize(dtype)
    template = template_entries(spec, sample) * TEMPLATE_ENTRY_BYTES
    if not sparse:
        return rows * cols * size + template
    nnz = structural_nnz(spec, sample)
    # indices + values while building, plus one copy while coalescing / converting
    return 2 * nnz * (2 * INDEX_BYTES + size) + (rows + 1) * INDEX_BYTES + template


def check_matrix(
    spec: ConvSpec,
    sample: tuple[int, ...],
    dtype: torch.dtype,
    *,
    sparse: bool,
    max_memory: int | None = None,
) -> None:
    """Refuse (ConvtoolError) a matrix `T` that would not fit in memory, before building it."""
    rows = math.prod(spec.output_shape(sample))
    cols = math.prod(sample)
    kind = "sparse" if sparse else "dense"
    alternative = (
        "use a smaller input shape"
        if sparse
        else "use sparse=True, or a smaller input shape (the matrix has "
        f"{structural_nnz(spec, sample)} non-zeros)"
    )
    check_memory(
        matrix_bytes(spec, sample, dtype, sparse),
        f"the {kind} {rows} x {cols} matrix of {spec.describe()} on input {sample}",
        alternative,
        max_memory,
    )


def check_elements(count: int, dtype: torch.dtype, what: str, alternative: str) -> None:
    """Refuse a tensor of `count` elements of `dtype` that would not fit in memory."""
    check_memory(count * itemsize(dtype), what, alternative)
