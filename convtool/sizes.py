"""Every entry count and byte formula in one place: how big a form is, before anyone builds it.

Everything here is Python-int arithmetic on a :class:`~convtool.spec.ConvSpec` and one sample
shape: no tensor over output positions is ever allocated, so counting a layer costs the same
for a 3x3 input as for a 10^8 x 10^8 one. Sparse matrices use int64 indices (torch's sparse
tensors and the CSR files convtool writes), so an index costs `INDEX_BYTES`.

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
_CHUNK = 1 << 20  # output positions per numpy pass (reflect, taps past both edges)
_BOTH_SIDES_LIMIT = 1 << 24  # such positions counted one by one at most (about 2 s)


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
    if mode == "replicate":
        return _replicate_distinct(n, m, k, s, d, lo)
    return _reflect_distinct(n, m, k, s, d, lo)


def _reflect_distinct(n: int, m: int, k: int, s: int, d: int, lo: int) -> int:
    """Reflect (n >= 2). Output positions whose taps stay inside the input read k values.
    Those whose taps leave it on one side only fold back onto that side; with `e` the distance
    of the outermost tap past the edge and `j0 = ceil(e / d)` taps outside, the folded taps
    land on the inside taps' lattice only when `d | 2e`, and then the union of the two runs
    has `max(j0, k - 1 - j0) + 1` values (`d | e`, the edge itself is read) or
    `max(j0, k - j0)` values (`e = d/2 mod d`). Summed per residue class of `e` in closed
    form. Positions whose taps leave on both sides (a dilated kernel wider than the input) are
    counted one by one in numpy chunks."""
    span = (k - 1) * d
    first = min(m, -(-lo // s))  # o < first: the first tap is left of the input
    last_in = (n - 1 + lo - span) // s  # o <= last_in: the last tap is inside
    total = m * k
    low = (0, min(first, last_in + 1))
    high = (max(first, last_in + 1, 0), m)
    total -= _fold_deficit(*low, lo, -s, n, k, d)  # e = lo - o*s
    total -= _fold_deficit(*high, span - lo - (n - 1), s, n, k, d)  # e = o*s - lo + span - n + 1
    both = (max(0, last_in + 1), first)
    if both[1] - both[0] > _BOTH_SIDES_LIMIT:
        raise ConvtoolError(
            f"counting the non-zeros of reflect padding where the dilated kernel ({span + 1}) is "
            f"wider than the input ({n}) takes one step per output position, and "
            f"{both[1] - both[0]} positions are too many; use a smaller input or dilation"
        )
    for c0 in range(both[0], both[1], _CHUNK):
        o = np.arange(c0, min(both[1], c0 + _CHUNK), dtype=object if n > 2**30 else np.int64)
        total += int(_reflect_counts(o * s - lo, n, k, d).sum()) - k * len(o)
    return total


def _fold_deficit(start: int, stop: int, alpha: int, beta: int, n: int, k: int, d: int) -> int:
    """`sum(k - distinct)` over o in [start, stop) for taps leaving the input on one side by
    `e = alpha + beta*o > 0` (see :func:`_reflect_distinct`)."""
    if stop <= start:
        return 0
    deficit = 0
    # (residue of e mod d, offset making j an integer, tent width): d | e, then e = d/2 mod d
    classes = [(0, 0, k - 1)] + ([(d // 2, d // 2, k)] if d % 2 == 0 else [])
    for residue, offset, width in classes:
        solved = _solve(beta, residue - alpha, d)
        if solved is None:
            continue
        o1, period = solved
        t_lo = -(-(start - o1) // period)
        t_hi = (stop - 1 - o1) // period
        if t_hi < t_lo:
            continue
        # j = (e + offset) / d along the class: an arithmetic progression in t
        j_a = (alpha + beta * (o1 + t_lo * period) + offset) // d
        j_b = (alpha + beta * (o1 + t_hi * period) + offset) // d
        step = abs(beta * period) // d
        count = t_hi - t_lo + 1
        j_first = min(j_a, j_b)
        deficit += _tent_sum(j_first, step, count, width, k - 1)
    return deficit


def _solve(beta: int, rhs: int, d: int) -> tuple[int, int] | None:
    """Smallest o >= 0 with `beta*o = rhs (mod d)` and the period of the solutions, or None."""
    g = math.gcd(beta, d)
    if rhs % g:
        return None
    period = d // g
    if period == 1:
        return 0, 1
    return (rhs // g) * pow((beta // g) % period, -1, period) % period, period


def _tent_sum(j_first: int, step: int, count: int, width: int, j_max: int) -> int:
    """`sum(min(j, width - j))` over `j = j_first + step*i`, i < count, restricted to
    1 <= j <= j_max (taps outside fewer than k: others read k distinct values); step >= 1."""
    lo_i = 0 if j_first >= 1 else -(-(1 - j_first) // step)
    hi_i = min(count - 1, (j_max - j_first) // step)
    if hi_i < lo_i:
        return 0
    start, num = j_first + lo_i * step, hi_i - lo_i + 1
    # j <= width / 2 contributes j, the rest width - j
    rising = min(num, max(0, (width // 2 - start) // step + 1))
    total = rising * start + step * rising * (rising - 1) // 2
    rest = num - rising
    if rest:
        first_rest = start + rising * step
        total += rest * width - (rest * first_rest + step * rest * (rest - 1) // 2)
    return total


def _congruent(start: int, stop: int, s: int, d: int, r: int) -> int:
    """`#{o in [start, stop) : o*s = r (mod d)}`."""
    if stop <= start:
        return 0
    g = math.gcd(s, d)
    if r % g:
        return 0
    period = d // g
    o0 = (r // g) * pow(s // g, -1, period) % period if period > 1 else 0
    return -((o0 - stop) // period) - -((o0 - start) // period)


def _replicate_distinct(n: int, m: int, k: int, s: int, d: int, lo: int) -> int:
    """Replicate (n >= 2): the taps inside the input, plus per output position one value for
    taps clamped to 0 (unless a tap reads 0 itself) and one for taps clamped to n - 1 (unless a
    tap reads n - 1 itself); each count is an arithmetic-progression count in closed form."""
    span = (k - 1) * d
    inside = axis_taps(n, m, k, s, d, lo, "zeros")
    # o*s - lo < 0: some tap left of the input; one of them reads 0 iff d | (lo - o*s) and
    # (lo - o*s) <= span
    below = min(m, -(-lo // s))
    reads_zero = _congruent(max(0, -(-(lo - span) // s)), below, s, d, lo)
    # o*s - lo + span > n - 1: some tap right of it; n - 1 is read iff d | (n - 1 + lo - o*s)
    # and o*s <= n - 1 + lo
    top = n - 1 + lo
    above_from = min(m, max(0, (top - span) // s + 1))
    reads_top = _congruent(above_from, min(m, top // s + 1), s, d, top)
    return inside + (below - reads_zero) + (m - above_from - reads_top)


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


# ---------------------------------------------------------------------------- checks
def matrix_bytes(spec: ConvSpec, sample: tuple[int, ...], dtype: torch.dtype, sparse: bool) -> int:
    """Peak bytes of building `T` (dense, or sparse with int64 indices), template included."""
    rows = math.prod(spec.output_shape(sample))
    cols = math.prod(sample)
    size = itemsize(dtype)
    template = template_entries(spec, sample) * TEMPLATE_ENTRY_BYTES
    if not sparse:
        return dense_bytes(rows, cols, size) + template
    return sparse_build_bytes(structural_nnz(spec, sample), rows, size) + template


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
        params=() if sparse else ("sparse",),
    )


def check_elements(count: int, dtype: torch.dtype, what: str, alternative: str) -> None:
    """Refuse a tensor of `count` elements of `dtype` that would not fit in memory."""
    check_memory(count * itemsize(dtype), what, alternative)
