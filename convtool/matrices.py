"""Index arithmetic -> the exact matrix `T` of a conv layer, dense or sparse.

For one sample `x` of shape `(C_in, *spatial)` and `y = layer(x)` of shape `(C_out, *out)`,
both flattened in C order, `y = T @ x + b`. Rows are `(c_out, out_position)`, columns
`(c_in, in_position)`.

How it is built (see DESIGN.md): the entries of one channel group are the same for every group
and every output channel in it, up to a row/column offset. So we compute a *template* once: for
each output position `o`, input channel in the group `ci` and kernel tap `k`, the input column
that tap reads (after the padding map: crop for zeros, a gather for the other modes, where
several taps may land on one column and are summed). Every output channel then is the template
shifted, with values gathered from its kernel. The cost is the template (`P_out * C_in/g * K`)
plus one pass over the non-zeros.

The template needs no sort and no mask over it: along each axis the (output, input index) pairs
are few (`out * k`, sorted there, and merged where padding folds taps together), the template's
entries are their product, and where each one goes in (row, col) order is a closed-form number
(:func:`_place`). A transposed conv's `T` gets its own template the same way, from the pairs
read the other way round (input index -> output positions), so it comes out sorted too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from convtool import sizes
from convtool.dtypes import compute_tensor
from convtool.errors import ConvtoolError
from convtool.sizes import structural_nnz, tap_count
from convtool.spec import ConvSpec

__all__ = ["structural_nnz", "tap_count"]  # counted in closed form by convtool.sizes

SparseLayout = Literal["coo", "csr"]


@dataclass(frozen=True)
class Template:
    """Entries of one (output channel, input-channel group) block of the forward-conv matrix.

    All index tensors are int64. Entries are sorted by (row, col) and unique.

    Attributes:
        rows: `(L,)` output position (flat index into out_spatial) of each entry.
        cols: `(L,)` column inside the group's input block: `ci_in_group * P_in + in_position`.
        src: `(U,)` index into the group's flattened kernel `w[co].reshape(-1)` for each tap.
        merge: `(U,)` entry (0..L-1) each tap adds into, or None when taps and entries coincide.
            When set, its first `L` values are `0..L-1` (each entry's first tap, in order): the
            values are then a gather plus a few additions.
        row_counts: `(P_out,)` entries per output position.
        out_spatial / in_spatial: spatial shapes on the forward-conv side.
    """

    rows: Tensor
    cols: Tensor
    src: Tensor
    merge: Tensor | None
    row_counts: Tensor
    out_spatial: tuple[int, ...]
    in_spatial: tuple[int, ...]


def _axis_positions(
    n: int, m: int, k: int, s: int, d: int, lo: int, mode: str
) -> tuple[Tensor, Tensor | None]:
    """Input index read by output position o and tap j along one axis: `(m, k)` int64.

    Returns the indices (already mapped back into [0, n) for non-zero padding modes) and, for
    zero padding, the mask of taps that read real input (None when all do).
    """
    pos = (
        torch.arange(m, dtype=torch.int64)[:, None] * s
        + torch.arange(k, dtype=torch.int64)[None, :] * d
        - lo
    )
    if mode == "zeros":
        valid = (pos >= 0) & (pos < n)
        if bool(valid.all()):
            return pos, None
        return pos.clamp(0, n - 1), valid
    if mode == "replicate":
        return pos.clamp(0, n - 1), None
    if mode == "circular":
        return pos.remainder(n), None
    if mode == "reflect":
        # PyTorch's reflect excludes the edge: -1 -> 1, n -> n - 2 (pad < n guarantees one bounce).
        pos = torch.where(pos < 0, -pos, pos)
        return torch.where(pos >= n, 2 * (n - 1) - pos, pos), None
    raise ConvtoolError(f"unknown padding_mode {mode!r}")


@dataclass(frozen=True)
class _AxisPairs:
    """Along one axis: the distinct (row, col) pairs that the taps make, sorted by (row, col).

    Attributes:
        counts: `(R,)` pairs per row.
        rows, cols, rank, taps: `(E,)` per pair: its row, its column, its index among its row's
            pairs, and the first tap (kernel index along the axis) landing on it.
        x_rows, x_rank, x_taps: `(X,)` per further tap landing on a pair that has its first
            tap already (several taps on one column, non-zero padding modes): the pair's row
            and rank, and the tap.
    """

    counts: Tensor
    rows: Tensor
    cols: Tensor
    rank: Tensor
    taps: Tensor
    x_rows: Tensor
    x_rank: Tensor
    x_taps: Tensor


def _axis_pairs(
    n: int, m: int, k: int, s: int, d: int, lo: int, mode: str, adjoint: bool
) -> _AxisPairs:
    """The (output position, input index) pairs of one axis, or with `adjoint` the (input
    index, output position) pairs: rows are input indices, as in a transposed conv's matrix.

    The work is a sort of `m * k` numbers: small, whatever the layer's other axes and channels.
    """
    pos, valid = _axis_positions(n, m, k, s, d, lo, mode)
    out = torch.arange(m, dtype=torch.int64).view(m, 1).expand(m, k)
    tap = torch.arange(k, dtype=torch.int64).view(1, k).expand(m, k)
    row, col, n_rows, n_cols = (pos, out, n, m) if adjoint else (out, pos, m, n)
    if valid is None:
        row, col, tap = row.reshape(-1), col.reshape(-1), tap.reshape(-1)
    else:
        row, col, tap = row[valid], col[valid], tap[valid]
    key, order = torch.sort(row * n_cols + col, stable=True)
    row, col, tap = row[order], col[order], tap[order]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    pair = torch.cumsum(first, 0) - 1
    rows = row[first]
    counts = torch.bincount(rows, minlength=n_rows)
    rank = torch.arange(rows.numel(), dtype=torch.int64) - (torch.cumsum(counts, 0) - counts)[rows]
    extra = ~first
    return _AxisPairs(
        counts, rows, col[first], rank, tap[first], row[extra], rank[pair[extra]], tap[extra]
    )


def _broadcast(parts: Sequence[Tensor]) -> list[Tensor]:
    """Views of 1-d tensors along successive dims of a common grid."""
    dims = len(parts)
    return [p.view([-1 if b == a else 1 for b in range(dims)]) for a, p in enumerate(parts)]


def _product(parts: Sequence[Tensor]) -> Tensor:
    """The broadcast product of tensors."""
    value = parts[0]
    for part in parts[1:]:
        value = value * part
    return value


def _mixed_radix(digits: Sequence[Tensor], radices: Sequence[Tensor]) -> Tensor:
    """`((d_1 * r_2 + d_2) * r_3 + d_3) ...` over a broadcast grid."""
    value = digits[0]
    for digit, radix in zip(digits[1:], radices[1:], strict=True):
        value = value * radix + digit
    return value


def _place(
    rows: Sequence[Tensor],
    rank: Sequence[Tensor],
    counts: Sequence[Tensor],
    row_start: Tensor,
    row_shape: Sequence[int],
    chans: int,
) -> tuple[Tensor, Tensor]:
    """Where each (channel, per-axis pair) combination sits in the template, in closed form.

    A template lists entries by (row, channel, pair_1, ..., pair_D): row `r` holds `chans *
    prod_a counts_a[r_a]` entries and the rest is a mixed-radix number. Inputs are per-axis
    1-d tensors (the pairs' rows and ranks, and the counts of their rows). Returns the flat
    row of each combination `(M,)` and its template index `(chans, M)`, `M` the grid size.
    """
    grid = [p.numel() for p in rows]
    size = math.prod(grid)
    rb = _broadcast(rows)
    flat_row = rb[-1]
    stride = 1
    for axis in range(len(rb) - 2, -1, -1):
        stride *= row_shape[axis + 1]
        flat_row = flat_row + rb[axis] * stride
    flat_row = flat_row.expand(grid).reshape(size)
    within = _mixed_radix(_broadcast(rank), _broadcast(counts)).expand(grid).reshape(size)
    per_chan = _product(_broadcast(counts)).expand(grid).reshape(size)
    dest = torch.arange(chans, dtype=torch.int64).view(chans, 1) * per_chan
    dest += row_start[flat_row] + within
    return flat_row, dest


def _flat(parts: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """C-order flat index over a broadcast grid of per-axis indices (same dims as `_place`)."""
    grid = [p.numel() for p in parts]
    value = torch.zeros((), dtype=torch.int64)
    stride = 1
    for axis in range(len(parts) - 1, -1, -1):
        value = value + _broadcast(parts)[axis] * stride
        stride *= sizes[axis]
    return value.expand(grid).reshape(-1)


def _build_template(
    axes: Sequence[_AxisPairs],
    row_shape: tuple[int, ...],
    col_shape: tuple[int, ...],
    kernel: tuple[int, ...],
    chans: int,
) -> Template:
    """The template of a product of per-axis pairs: no sort and no mask over the template.

    Every entry's place is computed (:func:`_place`) and the entries are written there, so the
    cost is a few passes over the template whatever the padding mode or the kind of conv.
    """
    p_rows, p_cols, ktaps = math.prod(row_shape), math.prod(col_shape), math.prod(kernel)
    row_counts = chans * _product(_broadcast([a.counts for a in axes]))
    row_counts = row_counts.expand(row_shape).reshape(p_rows)
    row_start = torch.cumsum(row_counts, 0) - row_counts
    total = int(row_counts.sum())
    chan = torch.arange(chans, dtype=torch.int64).view(chans, 1)

    flat_row, dest = _place(
        [a.rows for a in axes],
        [a.rank for a in axes],
        [a.counts[a.rows] for a in axes],
        row_start,
        row_shape,
        chans,
    )
    rows = torch.empty(total, dtype=torch.int64)
    cols = torch.empty(total, dtype=torch.int64)
    src = torch.empty(total, dtype=torch.int64)
    rows[dest] = flat_row
    where = dest.view(-1)
    cols.scatter_(0, where, (chan * p_cols + _flat([a.cols for a in axes], col_shape)).view(-1))
    src.scatter_(0, where, (chan * ktaps + _flat([a.taps for a in axes], kernel)).view(-1))

    # Further taps on a column (padding modes that fold the border back): for axis `a`, the
    # combinations whose axis-`a` tap is a further one, axes before it first taps and axes
    # after it any tap. Each tap is counted once; their values are added onto the entries.
    extra_src, extra_dest = [src], [torch.arange(total, dtype=torch.int64)]
    for axis, pairs in enumerate(axes):
        if pairs.x_rows.numel() == 0:
            continue
        parts = []
        for b, other in enumerate(axes):
            if b < axis:
                parts.append((other.rows, other.rank, other.taps))
            elif b == axis:
                parts.append((other.x_rows, other.x_rank, other.x_taps))
            else:
                parts.append(
                    (
                        torch.cat([other.rows, other.x_rows]),
                        torch.cat([other.rank, other.x_rank]),
                        torch.cat([other.taps, other.x_taps]),
                    )
                )
        _, where = _place(
            [p[0] for p in parts],
            [p[1] for p in parts],
            [axes[b].counts[p[0]] for b, p in enumerate(parts)],
            row_start,
            row_shape,
            chans,
        )
        extra_dest.append(where.reshape(-1))
        extra_src.append((chan * ktaps + _flat([p[2] for p in parts], kernel)).reshape(-1))
    merge = None
    if len(extra_src) > 1:
        src, merge = torch.cat(extra_src), torch.cat(extra_dest)
    return Template(rows, cols, src, merge, row_counts, row_shape, col_shape)


@lru_cache(maxsize=8)
def _template_cached(
    in_spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    cin_g: int,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    pad_lo: tuple[int, ...],
    mode: str,
) -> Template:
    axes = [
        _axis_pairs(n, m, k, s, d, lo, mode, adjoint=False)
        for n, m, k, s, d, lo in zip(
            in_spatial, out_spatial, kernel, stride, dilation, pad_lo, strict=True
        )
    ]
    return _build_template(axes, out_spatial, in_spatial, kernel, cin_g)


@lru_cache(maxsize=8)
def _adjoint_template_cached(
    in_spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    cout_g: int,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    pad_lo: tuple[int, ...],
) -> Template:
    """Template of the *transpose* of a zero-padded forward conv's matrix, in its own (row,
    col) order: rows are the forward input positions, channels the forward output channels of
    a group, `src` indexes a forward kernel read as `(C_in/g, C_out/g * K)` per group."""
    axes = [
        _axis_pairs(n, m, k, s, d, lo, "zeros", adjoint=True)
        for n, m, k, s, d, lo in zip(
            in_spatial, out_spatial, kernel, stride, dilation, pad_lo, strict=True
        )
    ]
    return _build_template(axes, in_spatial, out_spatial, kernel, cout_g)


def _forward_geometry(
    spec: ConvSpec, input_shape: Sequence[int]
) -> tuple[ConvSpec, tuple[int, ...], tuple[int, ...]]:
    """The forward conv whose matrix (or its transpose) is this layer's, with its spatial shapes.

    For a transposed conv with weight `(C_in, C_out/g, *k)`, the forward conv has that same
    weight read as `(out, in/g, *k)`, input = the transposed conv's output and output = the
    transposed conv's input (rows past it, possible with output_padding >= stride, are dropped).
    """
    sample = spec.sample_shape(input_shape)
    out_shape = spec.output_shape(sample)
    if not spec.transposed:
        return spec, sample[1:], out_shape[1:]
    fwd = ConvSpec(
        ndim=spec.ndim,
        in_channels=spec.out_channels,
        out_channels=spec.in_channels,
        kernel_size=spec.kernel_size,
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
        groups=spec.groups,
        padding_mode="zeros",
        transposed=False,
        output_padding=(0,) * spec.ndim,
        bias=False,
    )
    return fwd, out_shape[1:], sample[1:]


def template(spec: ConvSpec, input_shape: Sequence[int]) -> tuple[ConvSpec, Template]:
    """The forward-conv spec and the template of its matrix (see module docstring)."""
    fwd, in_sp, out_sp = _forward_geometry(spec, input_shape)
    sample = spec.sample_shape(input_shape)
    sizes.check_elements(
        sizes.template_entries(spec, sample) * (sizes.TEMPLATE_ENTRY_BYTES // 8),
        torch.int64,
        f"the index template of {spec.describe()} on input {sample}",
        "use a smaller input shape",
    )
    tpl = _template_cached(
        in_sp,
        out_sp,
        fwd.in_channels // fwd.groups,
        fwd.kernel_size,
        fwd.stride,
        fwd.dilation,
        tuple(lo for lo, _ in fwd.pad_pairs),
        fwd.padding_mode,
    )
    return fwd, tpl


def matrix_shape(spec: ConvSpec, input_shape: Sequence[int]) -> tuple[int, int]:
    """`(rows, cols)` of `T`: (numel of one output sample, numel of one input sample)."""
    sample = spec.sample_shape(input_shape)
    return math.prod(spec.output_shape(sample)), math.prod(sample)


def _check_weight(spec: ConvSpec, weight: Tensor) -> Tensor:
    """The weight detached, in its compute dtype (integers -> float64; see convtool.dtypes)."""
    if isinstance(weight, Tensor) and tuple(weight.shape) != spec.weight_shape:
        raise ConvtoolError(
            f"weight has shape {tuple(weight.shape)} but {spec.describe()} needs "
            f"{spec.weight_shape}"
        )
    return compute_tensor(weight)


def _values(fwd: ConvSpec, tpl: Template, weight: Tensor, co: slice) -> Tensor:
    """Values of the entries of output channels `co` (forward side): `(n_co, L)`."""
    return _gather(weight.reshape(fwd.out_channels, -1)[co], tpl)


def _gather(w: Tensor, tpl: Template) -> Tensor:
    """Template values for kernels `w (n, C/g * K)`: `(n, L)`, merged taps summed."""
    entries = tpl.rows.numel()
    # index_select, not w[:, src]: advanced indexing along dim 1 is several times slower.
    if tpl.merge is None:
        return torch.index_select(w, 1, tpl.src)
    vals = torch.index_select(w, 1, tpl.src[:entries])  # each entry's first tap (Template.merge)
    extra = tpl.merge[entries:]
    if extra.numel():
        # One flat index_add: along dim 1 of a 2-d tensor it would add column by column.
        where = (torch.arange(w.shape[0], dtype=torch.int64).view(-1, 1) * entries + extra).view(-1)
        vals.view(-1).index_add_(0, where, torch.index_select(w, 1, tpl.src[entries:]).view(-1))
    return vals


def coo_entries(
    spec: ConvSpec,
    weight: Tensor,
    input_shape: Sequence[int],
    out_channels: slice | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`(rows, cols, values)` of the forward-conv matrix, sorted by (row, col), no duplicates.

    For a transposed conv these are the entries of the *forward* conv whose transpose is `T`
    (swap rows and cols). `out_channels` restricts to a range of forward output channels (the
    rows of that range), which is how large matrices are streamed in blocks. `out`, a `(2, nnz)`
    int64 tensor, receives rows and cols without an extra copy (COO indices).
    """
    weight = _check_weight(spec, weight)
    fwd, tpl = template(spec, input_shape)
    co = out_channels or slice(0, fwd.out_channels)
    start, stop, _ = co.indices(fwd.out_channels)
    channels = torch.arange(start, stop, dtype=torch.int64)[:, None]
    p_in = math.prod(tpl.in_spatial)
    p_out = math.prod(tpl.out_spatial)
    cin_g = fwd.in_channels // fwd.groups
    cout_g = fwd.out_channels // fwd.groups
    if out is None:
        out = torch.empty((2, (stop - start) * tpl.rows.numel()), dtype=torch.int64)
    shape = (stop - start, tpl.rows.numel())
    torch.add(channels * p_out, tpl.rows, out=out[0].view(shape))
    torch.add((channels // cout_g) * (cin_g * p_in), tpl.cols, out=out[1].view(shape))
    vals = _values(fwd, tpl, weight, slice(start, stop)).reshape(-1)
    return out[0], out[1], vals


def _zeros(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A zero matrix. Large ones come from calloc (numpy): the OS hands out zeroed pages on first
    touch, so the scatter that follows is the only pass over memory instead of memset + scatter.
    """
    nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    if nbytes < (1 << 22):
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def _dense(spec: ConvSpec, weight: Tensor, input_shape: Sequence[int]) -> Tensor:
    weight = _check_weight(spec, weight)
    fwd, tpl = template(spec, input_shape)
    m, n = matrix_shape(spec, input_shape)
    out = _zeros((m, n), weight.dtype)
    target = out.t() if spec.transposed else out  # forward-conv (row, col) coordinates
    sr, sc = target.stride()
    p_in = math.prod(tpl.in_spatial)
    p_out = math.prod(tpl.out_spatial)
    groups = fwd.groups
    cout_g = fwd.out_channels // groups
    cin_g = fwd.in_channels // groups
    # A view (group, out channel in group, template offset) of the matrix: every element written
    # is a real entry of the matrix, so the view stays inside its storage.
    offsets = tpl.rows * sr + tpl.cols * sc
    if offsets.numel() == 0:  # every tap reads padding: T is all zeros
        return out
    view = torch.as_strided(
        out,
        (groups, cout_g, int(offsets.max()) + 1),
        (cout_g * p_out * sr + cin_g * p_in * sc, p_out * sr, 1),
    )
    vals = _values(fwd, tpl, weight, slice(None)).view(groups, cout_g, -1)
    view[:, :, offsets] = vals
    return out


def _own_template(
    spec: ConvSpec, weight: Tensor, input_shape: Sequence[int]
) -> tuple[Template, Tensor, int]:
    """The template of `T` in its own (row, col) order, the kernels it reads and the channels
    per group along its rows.

    Returns `(template, w, inner)`: row channel `c` of `T` takes its values from `w[c]`, a
    `(rows of T / P_out, inner * K)` matrix; its columns start at `(c // (len(w) / groups)) *
    inner * P_in`. For a conv that is the template and the weight; for a transposed conv the
    template of the transpose (no sort: its order is computed) and the weight regrouped.
    """
    fwd, in_sp, out_sp = _forward_geometry(spec, input_shape)
    if not spec.transposed:
        _, tpl = template(spec, input_shape)
        return tpl, weight.reshape(spec.out_channels, -1), spec.in_channels // spec.groups
    groups = spec.groups
    cout_g, cin_g = fwd.out_channels // groups, fwd.in_channels // groups
    tpl = _adjoint_template_cached(
        in_sp,
        out_sp,
        cout_g,
        fwd.kernel_size,
        fwd.stride,
        fwd.dilation,
        tuple(lo for lo, _ in fwd.pad_pairs),
    )
    # weight (C_in, C_out/g, *k) = forward (out, in/g, *k): row channel (g, ci) reads
    # w[g * cout_g + co, ci, k] at (co, k).
    w = weight.reshape(groups, cout_g, cin_g, -1).transpose(1, 2).reshape(groups * cin_g, -1)
    return tpl, w, cout_g


def _sparse(
    spec: ConvSpec, weight: Tensor, input_shape: Sequence[int], layout: SparseLayout
) -> Tensor:
    if layout not in ("coo", "csr"):
        raise ConvtoolError(f"sparse layout must be 'coo' or 'csr', got {layout!r}")
    size = matrix_shape(spec, input_shape)
    weight = _check_weight(spec, weight)
    tpl, w, inner = _own_template(spec, weight, input_shape)
    chans = w.shape[0]
    per_group = chans // spec.groups
    p_rows, p_cols = math.prod(tpl.out_spatial), math.prod(tpl.in_spatial)
    channels = torch.arange(chans, dtype=torch.int64)[:, None]
    entries = tpl.rows.numel()
    vals = _gather(w, tpl).reshape(-1)
    if layout == "csr":
        cols = ((channels // per_group) * (inner * p_cols) + tpl.cols).reshape(-1)
        crow = torch.zeros(size[0] + 1, dtype=torch.int64)
        torch.cumsum(tpl.row_counts.repeat(chans), 0, out=crow[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CSR support is in beta": we only build and multiply
            return torch.sparse_csr_tensor(crow, cols, vals, size, check_invariants=False)
    indices = torch.empty((2, chans * entries), dtype=torch.int64)
    torch.add(channels * p_rows, tpl.rows, out=indices[0].view(chans, entries))
    torch.add(
        (channels // per_group) * (inner * p_cols),
        tpl.cols,
        out=indices[1].view(chans, entries),
    )
    return torch.sparse_coo_tensor(indices, vals, size, is_coalesced=True, check_invariants=False)


def toeplitz_from_weight(
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
    sparse: bool = False,
    layout: SparseLayout = "coo",
    rows: object | None = None,
) -> Tensor:
    """The matrix of a conv given as a raw kernel plus PyTorch's hyperparameters.

    Args:
        weight: `(C_out, C_in/groups, *kernel)`, or `(C_in, C_out/groups, *kernel)` when
            `transposed`, as PyTorch stores it.
        input_shape: one sample `(C_in, *spatial)` (a leading batch dim is accepted).
        sparse: return a torch sparse tensor (built from indices, never from a dense matrix).
        layout: 'coo' (coalesced) or 'csr' when `sparse`.
        rows: a boolean output-position mask: only those rows (see :func:`toeplitz`).

    Returns:
        `T` of shape `(C_out * prod(out_spatial), C_in * prod(spatial))`, dtype of `weight`
        (float64 for an integer weight; a numpy array is accepted as a weight).
    """
    if isinstance(weight, np.ndarray):
        if weight.dtype.kind not in "fiub":
            raise ConvtoolError(f"weight must be a real numeric array, got dtype {weight.dtype}")
        native = weight.astype(weight.dtype.newbyteorder("="))  # big-endian arrays too
        weight = torch.from_numpy(np.ascontiguousarray(native))
    elif not isinstance(weight, Tensor):
        raise ConvtoolError(
            f"weight must be a torch tensor or a numpy array, got {type(weight).__name__}"
        )
    spec = ConvSpec.from_weight(
        tuple(weight.shape),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        transposed=transposed,
        output_padding=output_padding,
    )
    return matrix(spec, weight, input_shape, sparse=sparse, layout=layout, rows=rows)


def matrix(
    spec: ConvSpec,
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    sparse: bool = False,
    layout: SparseLayout = "coo",
    rows: object | None = None,
    max_memory: int | None = None,
) -> Tensor:
    """`T` for a spec and its weight (see :func:`toeplitz_from_weight`).

    The index arithmetic runs on the CPU; for a weight on another device the result is moved
    there. The memory `T` needs is checked against `max_memory` bytes (default: the machine's
    available memory) before anything is allocated. `rows`: a boolean output-position mask;
    only those rows (see :func:`toeplitz`), and only their size is checked.
    """
    if rows is not None:
        from convtool.region import region_matrix  # region builds on this module

        return region_matrix(
            spec, weight, input_shape, rows, sparse=sparse, layout=layout, max_memory=max_memory
        )
    sample = spec.sample_shape(input_shape)
    weight = _check_weight(spec, weight)
    sizes.check_matrix(spec, sample, weight.dtype, sparse=sparse, max_memory=max_memory)
    if weight.device.type != "cpu":
        cpu = weight.cpu()
        return matrix(spec, cpu, sample, sparse=sparse, layout=layout).to(weight.device)
    if sparse:
        return _sparse(spec, weight, input_shape, layout)
    return _dense(spec, weight, input_shape)


def toeplitz(
    layer: nn.Module,
    input_shape: Sequence[int],
    *,
    sparse: bool = False,
    layout: SparseLayout = "coo",
    rows: object | None = None,
) -> Tensor:
    """The exact matrix `T` of a conv layer: `layer(x).flatten() == T @ x.flatten() + b`.

    Args:
        layer: `nn.Conv1d/2d/3d` or `nn.ConvTranspose1d/2d/3d`, any hyperparameters.
        input_shape: one sample `(C_in, *spatial)` (a leading batch dim is accepted).
        sparse: return a torch sparse tensor (COO coalesced, or CSR with `layout='csr'`).
        rows: a boolean mask of shape `(*out_spatial)` (a tensor or numpy array): return only
            the rows of the masked output positions, for every output channel, in the full
            matrix's order, built directly from their entries. `convtool.region_rows(layer,
            input_shape, mask)` gives their indices in the full `T`. For a transposed conv the
            mask is over the transposed conv's own output positions.

    Returns:
        `T` of shape `(C_out * prod(out_spatial), C_in * prod(spatial))` (`C_out * mask.sum()`
        rows with `rows=`); the bias is :func:`bias_vector`.
    """
    spec = ConvSpec.from_module(layer)
    weight = layer.weight
    if not isinstance(weight, Tensor):
        raise ConvtoolError(f"{type(layer).__name__} has no weight tensor")
    return matrix(spec, weight, input_shape, sparse=sparse, layout=layout, rows=rows)


def bias_vector_for(
    spec: ConvSpec, bias: Tensor | None, input_shape: Sequence[int], dtype: torch.dtype
) -> Tensor:
    """The bias repeated per output position: `(C_out * prod(out_spatial),)`; zeros if None."""
    out_shape = spec.output_shape(input_shape)
    positions = math.prod(out_shape[1:])
    sizes.check_elements(
        out_shape[0] * positions,
        dtype,
        f"the bias vector of {spec.describe()} on input {spec.sample_shape(input_shape)}",
        "use a smaller input shape",
    )
    if bias is None:
        return torch.zeros(out_shape[0] * positions, dtype=dtype)
    bias = compute_tensor(bias, "the bias")
    if tuple(bias.shape) != (spec.out_channels,):
        raise ConvtoolError(
            f"bias has shape {tuple(bias.shape)} but {spec.describe()} needs ({spec.out_channels},)"
        )
    return bias.to(dtype).repeat_interleave(positions)


def bias_vector(layer: nn.Module, input_shape: Sequence[int]) -> Tensor:
    """`b` such that `layer(x).flatten() == toeplitz(layer, ...) @ x.flatten() + b`."""
    spec = ConvSpec.from_module(layer)
    weight, bias = layer.weight, getattr(layer, "bias", None)
    if not isinstance(weight, Tensor):
        raise ConvtoolError(f"{type(layer).__name__} has no weight tensor")
    return bias_vector_for(spec, bias, input_shape, compute_tensor(weight).dtype)


def dense_row_blocks(
    spec: ConvSpec, weight: Tensor, input_shape: Sequence[int], block_rows: int
) -> Iterator[tuple[int, Tensor]]:
    """Yield `(first_row, block)` covering `T` top to bottom, `block_rows` rows at a time.

    Only one block is in memory at a time, so a matrix larger than RAM can be streamed to disk.
    """
    weight = _check_weight(spec, weight)
    fwd, tpl = template(spec, input_shape)
    m, n = matrix_shape(spec, input_shape)
    block_rows = max(1, int(block_rows))
    p_in = math.prod(tpl.in_spatial)
    p_out = math.prod(tpl.out_spatial)
    groups = fwd.groups
    cout_g = fwd.out_channels // groups
    cin_g = fwd.in_channels // groups
    if spec.transposed:
        # Rows of T are columns of the forward matrix: walk the template in column order.
        order = torch.argsort(tpl.cols, stable=True)
        keys, rows_f = tpl.cols[order], tpl.rows[order]
        unit = cin_g * p_in  # T rows per group
    else:
        order = None
        keys, rows_f = tpl.rows, tpl.cols
        unit = p_out  # T rows per forward output channel
    cache: dict[int, Tensor] = {}

    def vals_of(channels: slice) -> Tensor:
        key = channels.start
        if key not in cache:
            cache.clear()
            v = _values(fwd, tpl, weight, channels)
            cache[key] = v if order is None else v[:, order]
        return cache[key]

    for r0 in range(0, m, block_rows):
        r1 = min(m, r0 + block_rows)
        block = weight.new_zeros((r1 - r0, n))
        for u in range(r0 // unit, (r1 - 1) // unit + 1):
            lo, hi = max(r0, u * unit) - u * unit, min(r1, (u + 1) * unit) - u * unit
            a, b = (int(i) for i in torch.searchsorted(keys, torch.tensor([lo, hi])))
            if a == b:
                continue
            local = keys[a:b] + u * unit - r0
            if spec.transposed:  # u is a group; every forward output channel of it contributes
                chans = slice(u * cout_g, (u + 1) * cout_g)
                cols = torch.arange(chans.start, chans.stop)[:, None] * p_out + rows_f[a:b]
                block[local.expand_as(cols), cols] = vals_of(chans)[:, a:b]
            else:  # u is a forward output channel
                cols = (u // cout_g) * cin_g * p_in + rows_f[a:b]
                block[local, cols] = vals_of(slice(u, u + 1))[0, a:b]
        yield r0, block


@dataclass(frozen=True)
class MatrixInfo:
    """Sizes of `T` for one layer and input, computed without building it."""

    layer: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    shape: tuple[int, int]
    nnz: int
    dtype: str
    itemsize: int

    @property
    def density(self) -> float:
        rows, cols = self.shape
        return self.nnz / (rows * cols)

    @property
    def dense_bytes(self) -> int:
        return sizes.dense_bytes(*self.shape, self.itemsize)

    @property
    def csr_bytes(self) -> int:
        """values + int64 column indices + int64 row pointers."""
        return sizes.csr_bytes(self.nnz, self.shape[0], self.itemsize)

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "matrix_shape": list(self.shape),
            "nnz": self.nnz,
            "density": self.density,
            "dtype": self.dtype,
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.csr_bytes,
        }


def matrix_info(spec: ConvSpec, input_shape: Sequence[int], dtype: torch.dtype) -> MatrixInfo:
    """Shapes, nnz and byte sizes of `T` (O(out_size * kernel) work, no matrix)."""
    sample = spec.sample_shape(input_shape)
    return MatrixInfo(
        layer=spec.describe(),
        input_shape=sample,
        output_shape=spec.output_shape(sample),
        shape=matrix_shape(spec, sample),
        nnz=structural_nnz(spec, sample),
        dtype=str(dtype).removeprefix("torch."),
        itemsize=sizes.itemsize(dtype),
    )
