"""Row subsets in use: the conv's matrix and the conv itself at chosen output positions only.

A *region* is a boolean mask over the output's spatial positions, shape `(*out_spatial)` (for
:class:`RegionConv` also one mask per sample, `(N, *out_spatial)`). Every output channel is
computed at those positions, so the region's rows of `T` are, in the full matrix's order,
`c * prod(out_spatial) + p` for each output channel `c` and each selected flat position `p`
(:func:`region_rows`).

For a transposed conv the region is likewise a mask over the positions of *its own* output (the
rows of its `T`), whose shape is `ConvTranspose*d`'s output shape (output_padding included).

Both the rows of `T` and :class:`RegionConv` come from one piece of index arithmetic restricted to
the selected positions (:func:`_taps`): for each selected output position and kernel tap, the
input position it reads after the padding map (or, for a transposed conv, the input position
whose scatter lands there), and whether it reads a real value. Nothing of size
`prod(out_spatial) * taps` is built.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convtool import sizes
from convtool.errors import ConvtoolError
from convtool.matrices import _axis_positions, _check_weight
from convtool.resources import check_memory
from convtool.spec import ConvSpec, build_conv

SparseLayout = Literal["coo", "csr"]
# Makes a region path's output: (like, shape, fill or None for uninitialised) -> tensor.
Filled = Callable[[Tensor, tuple[int, ...], float | None], Tensor]


# ---------------------------------------------------------------------------- masks
def _as_bool_tensor(mask: Any, what: str = "mask") -> Tensor:
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, Tensor):
        raise ConvtoolError(f"{what} must be a boolean tensor or array, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ConvtoolError(f"{what} must have dtype bool, got {mask.dtype}")
    return mask


def _shapes(spec: ConvSpec, input_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One sample's input and output shapes, `(C_in, *spatial)` and `(C_out, *out_spatial)`."""
    sample = spec.sample_shape(input_shape)
    return sample, spec.output_shape(sample)


def region_positions(mask: Any, out_spatial: Sequence[int]) -> Tensor:
    """Flat output positions (C order, ascending) selected by a mask of shape `out_spatial`."""
    m = _as_bool_tensor(mask)
    if tuple(m.shape) != tuple(out_spatial):
        raise ConvtoolError(
            f"the region mask has shape {tuple(m.shape)} but the output positions are "
            f"{tuple(out_spatial)} (one boolean per output position)"
        )
    return m.reshape(-1).nonzero().reshape(-1).cpu()


def region_rows(layer: nn.Module, input_shape: Sequence[int], mask: Any) -> Tensor:
    """Indices into the full `T`'s rows of the rows `toeplitz(layer, input_shape, rows=mask)` has.

    Args:
        layer: any conv module convtool supports.
        input_shape: one sample `(C_in, *spatial)` (a leading batch dim is accepted).
        mask: boolean `(*out_spatial)`.

    Returns:
        int64 `(C_out * mask.sum(),)`: `c * prod(out_spatial) + p` for every output channel `c`
        and selected flat position `p`, ascending (the full matrix's row order).
    """
    return region_rows_for(ConvSpec.from_module(layer), input_shape, mask)


def region_rows_for(spec: ConvSpec, input_shape: Sequence[int], mask: Any) -> Tensor:
    """:func:`region_rows` for a spec."""
    _, out = _shapes(spec, input_shape)
    pos = region_positions(mask, out[1:])
    p_out = math.prod(out[1:])
    channels = torch.arange(out[0], dtype=torch.int64)[:, None] * p_out
    return (channels + pos[None, :]).reshape(-1)


def parse_box(text: str, out_spatial: Sequence[int]) -> Tensor:
    """A box region `'h0:h1,w0:w1'` (one half-open range per output axis) as a boolean mask.

    Omitted bounds mean the edge (`':8,4:'`); negative bounds count from the end like Python's.
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(out_spatial):
        raise ConvtoolError(
            f"the region box {text!r} has {len(parts)} range(s) but the output has "
            f"{len(out_spatial)} spatial axes {tuple(out_spatial)}; give one 'start:stop' per axis"
        )
    mask = torch.zeros(tuple(out_spatial), dtype=torch.bool)
    index: list[slice] = []
    for part, size in zip(parts, out_spatial, strict=True):
        bounds = part.split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            lo, hi = (int(b) if b.strip() else None for b in bounds)
        except ValueError:
            raise ConvtoolError(
                f"the region box {text!r} needs 'start:stop' integer ranges, got {part!r}"
            ) from None
        start, stop, _ = slice(lo, hi).indices(size)
        if start >= stop:
            raise ConvtoolError(
                f"the region box range {part!r} selects no position of an axis of size {size}"
            )
        index.append(slice(start, stop))
    mask[tuple(index)] = True
    return mask


# ---------------------------------------------------------------------------- index arithmetic
def _transposed_axis(
    n: int, m: int, k: int, s: int, d: int, lo: int
) -> tuple[Tensor, Tensor | None]:
    """Transposed conv along one axis: input index whose tap j lands on output position q.

    Output `q` (of `n`) receives input `o` (of `m`) through tap `j` when `q = o*s + j*d - lo`.
    Returns `(n, k)` indices (clamped into range) and the mask of the taps that exist.
    """
    num = torch.arange(n, dtype=torch.int64)[:, None] + lo - torch.arange(k)[None, :] * d
    o = torch.div(num, s, rounding_mode="floor")
    valid = (num.remainder(s) == 0) & (o >= 0) & (o < m)
    if bool(valid.all()):
        return o, None
    return o.clamp(0, m - 1), valid


@functools.lru_cache(maxsize=64)
def _axis_table(
    n_in: int, n_out: int, k: int, s: int, d: int, lo: int, mode: str, transposed: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """One axis's `(n_out, k)` input index per output coordinate and tap, and the mask of the
    taps that read a real value (None when all do), as read-only numpy arrays.

    Cached: they depend only on the geometry, and `RegionConv` asks for them at every call.
    """
    if transposed:
        pos, ok = _transposed_axis(n_out, n_in, k, s, d, lo)
    else:
        pos, ok = _axis_positions(n_in, n_out, k, s, d, lo, mode)
    pos_np = pos.numpy()
    pos_np.flags.writeable = False
    if ok is None:
        return pos_np, None
    ok_np = ok.numpy()
    ok_np.flags.writeable = False
    return pos_np, ok_np


def _taps(
    spec: ConvSpec,
    in_spatial: Sequence[int],
    out_spatial: Sequence[int],
    positions: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """Per selected output position and kernel tap, the flat input position it reads.

    Args:
        positions: `(M,)` flat output positions (C order over `out_spatial`).

    Returns:
        `(M, K)` int64 flat input positions (always inside the input: padding modes are mapped
        back, taps on zero padding are clamped) and a `(M, K)` bool mask of the taps that read a
        real value, or None when all do. Tap order is the kernel's C order.

    Computed in numpy: a few operations per axis on `M * k` numbers, where each torch call's
    own overhead made up most of a small region's time.
    """
    ndim = spec.ndim
    m_count = positions.numel()
    flat = np.zeros((m_count,) + (1,) * ndim, dtype=np.int64)
    valid: np.ndarray | None = None
    rest = positions.cpu().numpy().astype(np.int64, copy=False)
    in_stride = 1
    for axis in reversed(range(ndim)):
        rest, coord = np.divmod(rest, out_spatial[axis])
        k, s, d = spec.kernel_size[axis], spec.stride[axis], spec.dilation[axis]
        pos, ok = _axis_table(
            int(in_spatial[axis]),
            int(out_spatial[axis]),
            k,
            s,
            d,
            spec.pad_pairs[axis][0],
            spec.padding_mode,
            spec.transposed,
        )
        view = [m_count] + [1] * ndim
        view[1 + axis] = k
        flat = flat + pos[coord].reshape(view) * in_stride
        if ok is not None:
            okv = ok[coord].reshape(view)
            valid = okv if valid is None else valid & okv
        in_stride *= int(in_spatial[axis])
    taps = math.prod(spec.kernel_size)
    shape = (m_count, *spec.kernel_size)
    flat_t = torch.from_numpy(_filled_copy(flat, shape).reshape(-1, taps))
    if valid is None:
        return flat_t, None
    return flat_t, torch.from_numpy(_filled_copy(valid, shape).reshape(-1, taps))


def _filled_copy(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`a` broadcast to `shape`, as a fresh writable array."""
    out = np.empty(shape, dtype=a.dtype)
    np.copyto(out, a)
    return out


def row_weight(spec: ConvSpec, weight: Tensor) -> Tensor:
    """The weight as `(C_out, C_in/groups * K)`: row `c` holds what output channel `c` multiplies
    with input channel `ci` of its group at tap `k`, at column `ci * K + k`.

    For a conv that is `weight.reshape(C_out, -1)`; a transposed conv's weight
    `(C_in, C_out/groups, *k)` is regrouped (taps are not flipped: :func:`_taps` indexes each tap
    by where it lands).
    """
    taps = math.prod(spec.kernel_size)
    if not spec.transposed:
        return weight.reshape(spec.out_channels, -1)
    g = spec.groups
    w = weight.reshape(g, spec.in_channels // g, spec.out_channels // g, taps)
    return w.permute(0, 2, 1, 3).reshape(spec.out_channels, -1)


# ---------------------------------------------------------------------------- rows of T
def region_matrix(
    spec: ConvSpec,
    weight: Tensor,
    input_shape: Sequence[int],
    mask: Any,
    *,
    sparse: bool = False,
    layout: SparseLayout = "coo",
    max_memory: int | None = None,
) -> Tensor:
    """The rows of `T` at the masked output positions, built from their own entries only.

    Returns `T[region_rows_for(spec, input_shape, mask)]`, shape `(C_out * M, C_in * P_in)` with
    `M = mask.sum()`: dense, or torch sparse (COO coalesced, or CSR). The work and memory are
    proportional to the region's entries (`C_out * M * C_in/groups * K`), never to `T`'s; the
    result's size is checked against `max_memory` bytes (default: available memory) first.
    """
    if sparse and layout not in ("coo", "csr"):
        raise ConvtoolError(f"sparse layout must be 'coo' or 'csr', got {layout!r}")
    weight = _check_weight(spec, weight)
    sample, out = _shapes(spec, input_shape)
    pos = region_positions(mask, out[1:])
    shape_info = region_counts(spec, input_shape, mask)
    item = weight.element_size()
    if sparse:
        need = sizes.sparse_build_bytes(shape_info["nnz"], shape_info["rows"], item)
    else:
        need = sizes.dense_bytes(shape_info["rows"], shape_info["cols"], item)
    check_memory(
        need,
        f"the {'sparse' if sparse else 'dense'} {shape_info['rows']} x {shape_info['cols']} region "
        f"matrix of {spec.describe()}",
        "use sparse=True or a smaller region" if not sparse else "use a smaller region",
        max_memory,
        params=() if sparse else ("sparse",),
    )
    if weight.device.type != "cpu":  # index arithmetic on the CPU, result moved back
        cpu = region_matrix(spec, weight.cpu(), input_shape, mask, sparse=sparse, layout=layout)
        return cpu.to(weight.device)
    m_count = pos.numel()
    p_in = math.prod(sample[1:])
    g = spec.groups
    cin_g, cout_g = spec.in_channels // g, spec.out_channels // g
    taps = math.prod(spec.kernel_size)
    size = (spec.out_channels * m_count, spec.in_channels * p_in)

    # One group's block: entries (row in region, ci * P_in + input position, kernel index).
    flat, valid = _taps(spec, sample[1:], out[1:], pos)
    ci = torch.arange(cin_g, dtype=torch.int64).view(1, cin_g, 1)
    cols = (ci * p_in + flat[:, None, :]).expand(m_count, cin_g, taps)
    src = (ci * taps + torch.arange(taps).view(1, 1, taps)).expand(m_count, cin_g, taps)
    rows = torch.arange(m_count, dtype=torch.int64).view(-1, 1, 1).expand(m_count, cin_g, taps)
    if valid is not None:
        keep = valid[:, None, :].expand(m_count, cin_g, taps)
        rows, cols, src = rows[keep], cols[keep], src[keep]
    else:
        rows, cols, src = rows.reshape(-1), cols.reshape(-1), src.reshape(-1)
    # Sort by (row, col) and merge taps a padding map (or nothing, for a transposed conv whose
    # taps run backwards) put out of order or on one column.
    key = rows * (cin_g * p_in) + cols
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    w = row_weight(spec, weight)
    vals = w[:, src]
    if uniq.numel() != key.numel() or not bool((inverse[1:] > inverse[:-1]).all()):
        rows, cols = uniq // (cin_g * p_in), uniq % (cin_g * p_in)
        vals = vals.new_zeros((spec.out_channels, uniq.numel())).index_add_(1, inverse, vals)

    channels = torch.arange(spec.out_channels, dtype=torch.int64)[:, None]
    all_rows = (channels * m_count + rows).reshape(-1)
    all_cols = ((channels // cout_g) * (cin_g * p_in) + cols).reshape(-1)
    vals = vals.reshape(-1)
    if not sparse:
        dense = weight.new_zeros(size)
        dense[all_rows, all_cols] = vals
        return dense
    if layout == "csr":
        counts = torch.bincount(rows, minlength=m_count).repeat(spec.out_channels)
        crow = torch.zeros(size[0] + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=crow[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CSR support is in beta"
            return torch.sparse_csr_tensor(crow, all_cols, vals, size, check_invariants=False)
    indices = torch.stack([all_rows, all_cols])
    return torch.sparse_coo_tensor(indices, vals, size, is_coalesced=True, check_invariants=False)


# ---------------------------------------------------------------------------- counts
def _axis_tables(spec: ConvSpec, input_shape: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Per output axis: `(taps, distinct)` per output coordinate, both `(out_size,)` int64.

    `taps`: kernel taps reading a real value (the multiply-adds); `distinct`: the distinct input
    positions they read (the non-zeros). Both factor over the axes per output position.
    """
    sample, out = _shapes(spec, input_shape)
    tables = []
    for axis in range(spec.ndim):
        n_in, n_out = sample[1 + axis], out[1 + axis]
        k, s, d = spec.kernel_size[axis], spec.stride[axis], spec.dilation[axis]
        lo = spec.pad_pairs[axis][0]
        if spec.transposed:
            pos, ok = _transposed_axis(n_out, n_in, k, s, d, lo)
        else:
            pos, ok = _axis_positions(n_in, n_out, k, s, d, lo, spec.padding_mode)
        real = torch.ones_like(pos, dtype=torch.bool) if ok is None else ok
        taps = real.sum(1)
        key = torch.where(real, pos, -1).sort(1).values
        distinct = ((key[:, 1:] != key[:, :-1]) & (key[:, 1:] >= 0)).sum(1) + (key[:, 0] >= 0)
        tables.append((taps, distinct.to(torch.int64)))
    return tables


def region_counts(spec: ConvSpec, input_shape: Sequence[int], mask: Any) -> dict[str, int]:
    """Sizes of the region form without building it.

    Returns:
        `positions` (selected output positions), `rows`/`cols` of the region matrix, `nnz`
        (its structural non-zeros) and `macs` (multiply-adds of one sample at the region:
        taps reading a real value), from per-axis tables summed over the mask:
        O(prod(out_spatial)) work.
    """
    sample, out = _shapes(spec, input_shape)
    m = _as_bool_tensor(mask)
    if tuple(m.shape) != tuple(out[1:]):
        raise ConvtoolError(
            f"the region mask has shape {tuple(m.shape)} but the output positions are "
            f"{tuple(out[1:])} (one boolean per output position)"
        )
    m = m.cpu()
    tables = _axis_tables(spec, input_shape)
    per_channel = spec.out_channels * (spec.in_channels // spec.groups)
    totals = []
    for which in (0, 1):
        grid = torch.ones((), dtype=torch.int64)
        for axis, table in enumerate(tables):
            shape = [1] * spec.ndim
            shape[axis] = -1
            grid = grid * table[which].view(shape)
        totals.append(int(torch.where(m, grid, 0).sum()) * per_channel)
    positions = int(m.sum())
    return {
        "positions": positions,
        "rows": spec.out_channels * positions,
        "cols": math.prod(sample),
        "nnz": totals[1],
        "macs": totals[0],
    }


# ---------------------------------------------------------------------------- RegionConv
Method = Literal["auto", "gather", "tiles", "full"]
METHODS = ("auto", "gather", "tiles", "full")


class RegionConv(nn.Module):
    """A conv computed only at chosen output positions.

    `RegionConv(conv)(x, mask)` equals `conv(x)` where `mask` is True and `fill` elsewhere. It
    shares `conv`'s parameters (gradients flow to them). Three ways to compute it:

    - `'gather'`: for each selected position gather the input values its kernel taps read
      (padding modes are index maps and zero padding a tap mask, so the input is never padded or
      copied), one GEMM per channel group (masked convs, as in mmcv), scatter into the output.
      Its cost follows the selected positions exactly, at im2col's price per position.
    - `'tiles'`: cover the selected positions with small output tiles, gather each active
      tile's input window (with its halo) through the padding map, run the layer's own conv on
      the stack of windows, and scatter the tiles back (SBNet's gather/scatter over active
      blocks). Cheaper per position than `'gather'` when the region is made of blobs or boxes;
      not available for transposed convs.
    - `'full'`: the full conv, then the mask.

    `'auto'` (the default) picks the one a cost model (fitted on `benchmarks/region.py`) expects
    to be fastest for each call's mask.

    The output is what makes a small region expensive: it is dense, and the conv's own time
    includes writing it. Outputs under 32 MiB reuse this module's previous output's memory once
    nothing refers to it any more (refilled at every call); larger ones come from fresh
    huge-page mappings, zero-filled by the kernel only where the region writes (see
    :func:`_filled`). Dense regions are assembled in one pass over the output instead of filled
    and scattered into.

    For a transposed conv the mask selects positions of the transposed conv's output.

    Args:
        layer: `nn.Conv1d/2d/3d` or `nn.ConvTranspose1d/2d/3d`, any hyperparameters.
        method: 'auto', 'gather', 'tiles' or 'full'.
    """

    def __init__(self, layer: nn.Module, method: Method = "auto") -> None:
        super().__init__()
        self.spec = ConvSpec.from_module(layer)
        if method not in METHODS:
            raise ConvtoolError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "tiles" and self.spec.transposed:
            raise ConvtoolError(
                "method='tiles' is not available for transposed convs; use 'gather' or 'auto'"
            )
        self.layer = layer
        self.method: str = method
        self.last_method: str | None = None  # what the latest call ran, for benchmarks and tests
        self._spare: torch.UntypedStorage | None = None  # see _filled

    def extra_repr(self) -> str:
        return f"method={self.method!r}"

    def __getstate__(self) -> dict[str, Any]:
        # a copy or a pickle starts without the previous output's memory (see _filled)
        state = super().__getstate__()
        return {**state, "_spare": None}

    def forward(self, x: Tensor, mask: Any, fill: float = 0.0) -> Tensor:
        """The conv's output at the masked positions, `fill` elsewhere.

        Args:
            x: `(N, C_in, *spatial)` (or one sample `(C_in, *spatial)`).
            mask: boolean `(*out_spatial)` shared by the batch, or `(N, *out_spatial)` per sample.
            fill: value of the unselected outputs.

        Returns:
            `(N, C_out, *out_spatial)` (no batch dim if `x` had none).
        """
        spec = self.spec
        if x.dim() == spec.ndim + 1:
            return self.forward(x[None], mask, fill)[0]
        if x.dim() != spec.ndim + 2:
            raise ConvtoolError(
                f"{spec.kind} expects an input (N, C_in, *spatial) with {spec.ndim + 2} dims, got "
                f"shape {tuple(x.shape)}"
            )
        sample = spec.checked_sample(tuple(x.shape))
        out = spec.output_shape(sample)
        out_sp = out[1:]
        n = x.shape[0]
        m = _as_bool_tensor(mask)
        if tuple(m.shape) == tuple(out_sp):
            shared = True
        elif tuple(m.shape) == (n, *out_sp):
            shared = False
        else:
            raise ConvtoolError(
                f"the region mask has shape {tuple(m.shape)} but the output positions are "
                f"{tuple(out_sp)} (shared by the batch) or {(n, *out_sp)} (per sample)"
            )
        m = m.to(x.device)
        layer: Any = self.layer
        weight: Tensor = layer.weight
        bias: Tensor | None = layer.bias
        method = self.method
        tiles: _Tiles | None = None
        if method == "auto":
            fresh = _fresh_zeros(x, (n, *out), fill)
            method, tiles = _choose(spec, m, shared, fresh)
        elif method == "tiles":
            tiles = _Tiles.cover(spec, m if not shared else m[None])
        self.last_method = method
        if method == "full":
            full = self.layer(x)
            finite = _surely_finite(x, weight, bias, full.numel())
            return _apply_mask(full, (m if not shared else m[None])[:, None], fill, finite)
        if method == "tiles":
            assert tiles is not None
            return _tiled(spec, x, tiles, shared, weight, bias, fill, out, self._filled)
        return _gather_gemm(spec, x, m, shared, weight, bias, fill, out, self._filled)

    def _filled(self, x: Tensor, shape: tuple[int, ...], fill: float | None) -> Tensor:
        """A fresh-looking `shape` tensor like `x`, every value `fill` (None: uninitialised), to
        write the region into.

        Outputs under 32 MiB reuse the memory of this module's previous one once nothing else
        refers to it (a caching allocator, as PyTorch's GPU allocator is): a freshly allocated
        output is page-faulted in at every call, which on a `(1, 64, 128, 128)` output took
        1 ms, more than a 1% region's whole work. The memory is filled again every time, so
        whatever was done to the previous output does not show, and a new tensor is made on
        it, with no autograd history. Larger outputs come from :func:`_filled`.
        """
        nbytes = math.prod(shape) * x.element_size()
        if nbytes >= _FRESH_MAPPING or _use_count is None or not _eager(x):
            return _filled(x, shape, fill)
        with _SPARE_LOCK:
            spare = self._spare
            if (
                spare is None
                or spare.nbytes() != nbytes
                or spare.device != x.device
                or _use_count(spare._cdata) > 1
            ):
                spare = torch.empty(shape, dtype=x.dtype, device=x.device).untyped_storage()
                self._spare = spare
            strides = [1] * len(shape)
            for axis in range(len(shape) - 2, -1, -1):
                strides[axis] = strides[axis + 1] * shape[axis + 1]
            result = x.new_empty(0).set_(spare, 0, shape, strides)
        return result if fill is None else result.fill_(fill)


# Cost model of 'auto', in units of the full conv's time, least-squares fitted on
# benchmarks/region.py (Conv2d 3x3, 3->64 and 64->64, 128^2 and 256^2, N = 1 and 8, blobs and
# boxes at 1-50%, one thread, shared 2-core machine). `w` is the share of the conv's time spent
# writing its output, OUTPUT_MACS / (OUTPUT_MACS + C_in/groups * taps): 3% of a 64->64 3x3
# conv, 40% of a 3->64 one. A region path costs FIXED (making the output) plus RATE per
# selected fraction (gather) or per tile coverage (tiles, halo included), each `a + b*w`, keyed
# by whether the output is a fresh zero mapping (see _filled): that one is filled for free and
# faulted in with huge pages, while the conv's own output is faulted in 4 KiB at a time, so a
# region gains most there; a smaller, reused output is filled by a pass over it, which on a
# 3->64 conv (little work per output value) is half the conv. 'full' is the conv plus a
# masking pass: FULL = a + b*w.
OUTPUT_MACS = 18.0
GATHER_FIXED = {True: (0.048, 0.231), False: (0.12, 1.324)}
GATHER_RATE = {True: (1.669, -1.531), False: (2.106, 4.759)}
TILE_FIXED = {True: (0.048, 0.231), False: (0.123, 1.515)}  # fresh: as gather (one fill)
TILE_RATE = {True: (1.234, 0.598), False: (1.147, 6.007)}
FULL = (1.04, 0.4)


def _apply_mask(values: Tensor, keep: Tensor, fill: float, finite: bool = False) -> Tensor:
    """`values` where `keep` (broadcast over it) is True, `fill` elsewhere, in place.

    In place because a conv's backward does not need its output. A multiply by the mask runs
    about 20x faster than `masked_fill_` or `torch.where` with a broadcast mask (one thread, an
    `(8, 64, 128, 128)` output: 2 ms against 40 ms, which at 50% density decided whether the
    'full' fallback met its target), but it is exact only on finite values (`inf * 0` is NaN): a
    non-finite sum (or fill) sends the call to `masked_fill_`. `finite`: the values are known
    to be finite (:func:`_surely_finite`), which saves that sum, a pass over them.
    """
    if not math.isfinite(fill) or not (finite or bool(torch.isfinite(values.detach().sum()))):
        return values.masked_fill_(~keep, fill)
    values.mul_(keep.to(values.dtype))
    if fill != 0:
        values.add_((~keep).to(values.dtype) * fill)
    return values


def _surely_finite(x: Tensor, weight: Tensor, bias: Tensor | None, out_numel: int) -> bool:
    """True when a conv of `x` cannot give a non-finite value, proved more cheaply than by
    reading its output: `|y| <= max|x| * sum|w| + max|b|`, well below the dtype's largest value.
    Only tried when the input is smaller than the output (a 3->64 conv's input is 1/21 of it);
    False when nothing is proved."""
    if x.numel() >= out_numel or not x.is_floating_point():
        return False
    with torch.no_grad():
        bound = x.abs().amax().double() * weight.abs().sum().double()
        if bias is not None:
            bound = bound + bias.abs().amax().double()
    return bool(torch.isfinite(bound)) and float(bound) < torch.finfo(x.dtype).max / 4


def _choose(spec: ConvSpec, mask: Tensor, shared: bool, fresh: bool) -> tuple[str, _Tiles | None]:
    """The method the cost model expects to be fastest, and the tile cover if it was made.

    `fresh`: the output is a fresh zero mapping (see :func:`_filled`). The cover is only made
    when tiles could win: they cover at least the selected positions and their halo, so below
    some density the gather path beats them whatever the cover (it saves a pass over the mask
    that rivals the whole call on a small region).
    """
    density = float(mask.sum()) / max(1, mask.numel())
    work = spec.in_channels // spec.groups * math.prod(spec.kernel_size)
    w = OUTPUT_MACS / (OUTPUT_MACS + work)  # the output write's share of the conv's time

    def line(coef: tuple[float, float]) -> float:
        return coef[0] + coef[1] * w

    costs = {
        "full": line(FULL),
        "gather": line(GATHER_FIXED[fresh]) + line(GATHER_RATE[fresh]) * density,
    }
    tiles: _Tiles | None = None
    tile_fixed, tile_rate = line(TILE_FIXED[fresh]), line(TILE_RATE[fresh])
    least = tile_fixed + tile_rate * density * _Tiles.halo(spec)
    if not spec.transposed and least < min(costs.values()):
        tiles = _Tiles.cover(spec, mask if not shared else mask[None])
        costs["tiles"] = tile_fixed + tile_rate * tiles.coverage
    return min(costs, key=lambda k: costs[k]), tiles


class _Tiles:
    """Active output tiles of a mask `(B, *out_spatial)` (B = 1 for a shared mask).

    Attributes:
        size: tile extent per axis; counts: tiles per axis (the last ones may overhang).
        index: `(T, 1 + D)` int64 (mask sample, tile coordinates) of the active tiles.
        inside: `(T, *size)` bool, the mask inside each active tile.
        coverage: fraction of output positions inside active tiles, halo included.
    """

    def __init__(
        self,
        size: tuple[int, ...],
        counts: tuple[int, ...],
        index: Tensor,
        inside: Tensor,
        coverage: float,
    ) -> None:
        self.size, self.counts, self.index, self.inside = size, counts, index, inside
        self.coverage = coverage

    @staticmethod
    def tile_size(spec: ConvSpec) -> tuple[int, ...]:
        # About 64 (1-d), 8x8 (2-d) or 4x4x4 (3-d) outputs: a halo of a few rows stays cheap and
        # the cover stays close to the mask.
        side = {1: 64, 2: 8, 3: 4}[spec.ndim]
        return (side,) * spec.ndim

    @classmethod
    def halo(cls, spec: ConvSpec) -> float:
        """Input read per output position of a tile, relative to the conv's (its halo)."""
        halo = 1.0
        size = cls.tile_size(spec)
        for t, k, s, d in zip(size, spec.kernel_size, spec.stride, spec.dilation, strict=True):
            halo *= ((t - 1) * s + (k - 1) * d + 1) / (t * s)
        return halo

    @classmethod
    def cover(cls, spec: ConvSpec, mask: Tensor) -> _Tiles:
        size = cls.tile_size(spec)
        out_sp = tuple(mask.shape[1:])
        counts = tuple(-(-o // t) for o, t in zip(out_sp, size, strict=True))
        pads: list[int] = []
        for o, t, c in zip(reversed(out_sp), reversed(size), reversed(counts), strict=True):
            pads += [0, c * t - o]
        padded = F.pad(mask, pads) if any(pads) else mask
        split: list[int] = [mask.shape[0]]
        for c, t in zip(counts, size, strict=True):
            split += [c, t]
        blocks = padded.reshape(split)
        ndim = spec.ndim
        perm = [0] + [1 + 2 * a for a in range(ndim)] + [2 + 2 * a for a in range(ndim)]
        blocks = blocks.permute(perm)  # (B, *counts, *size)
        active = blocks.flatten(1 + ndim).any(-1)
        index = active.nonzero()
        inside = blocks[tuple(index.t())]
        halo = cls.halo(spec)
        total = mask.shape[0] * math.prod(out_sp)
        coverage = index.shape[0] * math.prod(size) * halo / max(1, total)
        return cls(size, counts, index, inside, coverage)


def _tiled(
    spec: ConvSpec,
    x: Tensor,
    tiles: _Tiles,
    shared: bool,
    weight: Tensor,
    bias: Tensor | None,
    fill: float,
    out: tuple[int, ...],
    filled: Filled,
) -> Tensor:
    """RegionConv's tile path (see :class:`RegionConv`)."""
    n, ndim = x.shape[0], spec.ndim
    size, counts = tiles.size, tiles.counts
    index, inside = tiles.index, tiles.inside
    if index.shape[0] == 0:
        return filled(x, (n, *out), fill)
    if shared:  # every sample gets the same tiles
        a = index.shape[0]
        index = torch.cat(
            [torch.arange(n).repeat_interleave(a)[:, None], index[:, 1:].repeat(n, 1)], 1
        )
        inside = inside.repeat(n, *([1] * ndim))
    # Each tile's input window, through the padding map: per axis, window element w of tile c
    # reads padded position c * t * s + w, i.e. input c * t * s + w - lo (mapped back, or
    # reading zero padding). Positions past the end only feed outputs past the end: clamped.
    in_sp = tuple(x.shape[2:])
    window = [
        (t - 1) * s + (k - 1) * d + 1
        for t, k, s, d in zip(size, spec.kernel_size, spec.stride, spec.dilation, strict=True)
    ]
    a = index.shape[0]
    flat = torch.zeros((a,) + (1,) * ndim, dtype=torch.int64)
    valid: Tensor | None = None
    in_stride = 1
    for axis in reversed(range(ndim)):
        pos, ok = _axis_positions(
            in_sp[axis],
            counts[axis],
            window[axis],
            size[axis] * spec.stride[axis],
            1,
            spec.pad_pairs[axis][0],
            spec.padding_mode,
        )
        pos = pos.clamp(0, in_sp[axis] - 1)
        shape = [a] + [1] * ndim
        shape[1 + axis] = window[axis]
        flat = flat + pos[index[:, 1 + axis]].view(shape) * in_stride
        if ok is not None:
            okv = ok[index[:, 1 + axis]].view(shape)
            valid = okv if valid is None else valid & okv
        in_stride *= in_sp[axis]
    wvol = math.prod(window)
    flat = flat.expand(a, *window).reshape(a, wvol)
    # (T, window, C_in): channels last, which the conv takes as it is (no copy).
    dev = x.device
    patches = x.reshape(n, spec.in_channels, -1)[index[:, :1].to(dev), :, flat.to(dev)]
    if valid is not None and not bool(valid.all()):
        patches = patches * valid.expand(a, *window).reshape(a, wvol, 1).to(dev, x.dtype)
    patches = patches.view(a, *window, spec.in_channels).movedim(-1, 1)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
    # Back to (T, C_out, *tile) order: the scatter below then copies whole tile rows.
    vals = conv(patches, weight, bias, spec.stride, 0, spec.dilation, spec.groups).contiguous()
    vals = _apply_mask(vals, inside[:, None].to(x.device), fill)
    full_sp = [c * t for c, t in zip(counts, size, strict=True)]
    result = filled(x, (n, spec.out_channels, *full_sp), fill)
    split: list[int] = [n, spec.out_channels]
    for c, t in zip(counts, size, strict=True):
        split += [c, t]
    perm = [0] + [2 + 2 * a for a in range(ndim)] + [1] + [3 + 2 * a for a in range(ndim)]
    blocks = result.view(split).permute(perm)  # (N, *counts, C_out, *size), a view
    blocks[tuple(index.t().to(x.device))] = vals  # a fresh tensor: autograd records the write
    if tuple(full_sp) != tuple(out[1:]):
        crop = (slice(None), slice(None), *(slice(0, o) for o in out[1:]))
        result = result[crop].contiguous()
    return result


def _gather_gemm(
    spec: ConvSpec,
    x: Tensor,
    mask: Tensor,
    shared: bool,
    weight: Tensor,
    bias: Tensor | None,
    fill: float,
    out: tuple[int, ...],
    filled: Filled,
) -> Tensor:
    """RegionConv's gather path: gather the taps of the selected positions, one GEMM per
    channel group, write them into the `fill`ed output (:func:`_gather_gemm_shared`).

    Per-sample masks run it one sample at a time, writing into that sample's part of one
    output (filled once).
    """
    if shared:
        return _gather_gemm_shared(spec, x, mask, weight, bias, fill, out, filled)
    n = x.shape[0]
    result = filled(x, (n, *out), fill)
    fresh = _fresh_zeros(x, (n, *out), fill)
    for i in range(n):
        part = result[i : i + 1]
        # `part` holds `fill` already, which is what the scatter and the assembly both need.
        y = _gather_gemm_shared(
            spec, x[i : i + 1], mask[i], weight, bias, fill, out, _given(part), fresh=fresh
        )
        if y.data_ptr() != part.data_ptr():  # assembled as a new tensor (autograd)
            part.copy_(y)
    return result


def _given(t: Tensor) -> Filled:
    """An output maker that returns `t` (already made) whatever it is asked."""

    def make(_x: Tensor, _shape: tuple[int, ...], _fill: float | None) -> Tensor:
        return t

    return make


# Selected fraction of the output positions from which the shared-mask gather path builds its
# output by one index_select from the computed values (a sequential write of every output
# value) rather than filling it and scattering into it (the scatter costs 2-5 ns per value). A
# fresh zero mapping (see _filled) is filled for free and faulted in only where written, so
# scattering into it pays longer. Keyed by "fresh zero mapping"; measured with
# benchmarks/region.py's layers, 10-15% faster than the other way at 25-50%.
_ASSEMBLE = {True: 0.4, False: 0.1}
# Positions whose windows are gathered and multiplied at a time (at most _CHUNK_BYTES of
# windows): one buffer serves every chunk, instead of a fresh array nine times the region's
# input (a 3x3 kernel) page-faulted in at every call. 256 positions keep each GEMM wide enough
# to run near full speed (benchmarks/region.py, 64->64 at N=8, a 10% box: 5.6x the conv's speed
# against 4.6x with 113 positions) without leaving the cache on the small layers (3->64).
_CHUNK_POSITIONS = 256
_CHUNK_BYTES = 16 << 20


def _gather_gemm_shared(
    spec: ConvSpec,
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    fill: float,
    out: tuple[int, ...],
    filled: Filled,
    fresh: bool | None = None,
) -> Tensor:
    """The gather path for a mask shared by the batch, a chunk of positions at a time.

    Per chunk: `index_select` along the last axis of the `(N*C_in, P)` view (one index for all
    rows, about 3x faster than `torch.gather` with a broadcast index), zero the taps on zero
    padding, one matmul per channel group; then the bias, and one `index_copy_` of all values
    into the output's `(N*C_out, P)` view, or for a dense region (:data:`_ASSEMBLE`) one
    `index_select` that reads every output value from them. Without autograd the chunks reuse
    two buffers (`out=`); with it, each chunk's tensors are its own (autograd keeps them for
    the backward).
    """
    n, c_in, c_out = x.shape[0], spec.in_channels, spec.out_channels
    in_sp, out_sp = tuple(x.shape[2:]), out[1:]
    p_in, p_out = math.prod(in_sp), math.prod(out_sp)
    g = spec.groups
    cin_g, cout_g = c_in // g, c_out // g
    taps = math.prod(spec.kernel_size)
    dev = x.device
    pos = mask.reshape(-1).nonzero().reshape(-1).cpu()
    count = pos.numel()
    if count == 0:
        return filled(x, (n, *out), fill)
    # Dense enough regions assemble the output with one index_select instead (see below).
    if fresh is None:
        fresh = _fresh_zeros(x, (n, *out), fill)
    assemble = count >= _ASSEMBLE[fresh] * p_out
    width = count + 1 if assemble else count
    flat, valid = _taps(spec, in_sp, out_sp, pos)
    index = flat.t().contiguous().to(dev)  # (taps, count): tap-major, as the weight's columns
    if valid is not None:
        valid = valid.t().contiguous()
    x2d = x.reshape(n * c_in, p_in)
    w = row_weight(spec, weight).view(g, cout_g, cin_g * taps)
    b = None if bias is None else bias.view(g, cout_g, 1)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    step = min(_CHUNK_POSITIONS, max(1, _CHUNK_BYTES // (n * c_in * taps * x.element_size())))
    step = min(step, count)
    cols_buf = vals_buf = vals = None
    parts = []
    if not grad:
        cols_buf = x.new_empty(n * c_in * taps * step)
        vals_buf = x.new_empty(n * c_out * step)
        vals = x.new_empty(n, g, cout_g, width)
    for lo in range(0, count, step):
        hi = min(count, lo + step)
        m = hi - lo
        idx = index[:, lo:hi].reshape(-1)
        if cols_buf is None:
            cols = x2d.index_select(1, idx)
        else:
            cols = torch.index_select(
                x2d, 1, idx, out=cols_buf[: n * c_in * taps * m].view(n * c_in, taps * m)
            )
        if valid is not None:
            part = valid[:, lo:hi]
            if not bool(part.all()):
                # Only the taps on zero padding, in place (index_select's backward does not
                # need its output); a multiply by the tap mask would be a pass over `cols`.
                off = (~part.reshape(-1)).nonzero().reshape(-1).to(dev)
                cols = cols.index_fill_(1, off, 0.0)
        cols4 = cols.view(n, g, cin_g * taps, m)
        if vals is None or vals_buf is None:
            parts.append(torch.matmul(w, cols4))
        else:
            dest = vals_buf[: n * c_out * m].view(n, g, cout_g, m)
            vals[..., lo:hi].copy_(torch.matmul(w, cols4, out=dest))
    if vals is None:
        vals = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        if b is not None:
            vals = vals.add_(b)  # in place: the product's backward does not need it
        if assemble:
            vals = torch.cat([vals, vals.new_full((n, g, cout_g, 1), fill)], -1)
    else:
        if b is not None:
            vals[..., :count].add_(b)
        if assemble:
            vals[..., count] = fill
    if not assemble:
        # One scatter for all chunks: the output is written plane by plane, in order (chunk
        # by chunk it was 1.7x slower). In place: `result` is fresh, and a copy would double
        # the cost.
        result = filled(x, (n, *out), fill)
        rows = result.view(n * c_out, p_out)
        rows.index_copy_(1, pos.to(dev), vals.view(n * c_out, count))
        return result
    # Every output position reads its value (or the fill, kept in the last column): one
    # sequential pass over the output, where a scatter costs several times more per value
    # and needs the output filled first.
    source = np.full(p_out, count, dtype=np.int64)
    source[pos.numpy()] = np.arange(count)
    inverse = torch.from_numpy(source).to(dev)
    vals2d = vals.view(n * c_out, width)
    if grad:
        return vals2d.index_select(1, inverse).view(n, *out)
    result = filled(x, (n, *out), None)
    torch.index_select(vals2d, 1, inverse, out=result.view(n * c_out, p_out))
    return result


def _filled(x: Tensor, shape: tuple[int, ...], fill: float | None) -> Tensor:
    """A fresh `shape` tensor like `x`, every value `fill` (None: uninitialised), for the region
    paths to write into.

    Large CPU outputs (32 MiB and more: above glibc's largest mmap threshold every allocation
    is a fresh mapping, page-faulted in as it is written) come from numpy, which asks the
    kernel for transparent huge pages on them: a fault then maps 2 MiB at once. A zero fill
    comes from `calloc`, zero when mapped, so nothing writes the zeros and only the pages the
    region touches are faulted in. On an `(8, 64, 256, 256)` float32 output: 14 ms for a 1%
    region against 53 ms for `torch.zeros` (4 KiB faults, then every page written; the full
    conv pays those 50 ms for its own output). Smaller outputs are reused heap memory, where
    torch's own allocation is the cheaper. The tensor is an ordinary CPU tensor either way.
    """
    if not _large_cpu(x, shape):
        return x.new_empty(shape) if fill is None else x.new_full(shape, fill)
    dtype = np.float32 if x.dtype == torch.float32 else np.float64
    if fill is None:
        return torch.from_numpy(np.empty(shape, dtype=dtype))
    if fill == 0 and math.copysign(1.0, fill) > 0:
        return torch.from_numpy(np.zeros(shape, dtype=dtype))
    return torch.from_numpy(np.full(shape, fill, dtype=dtype))


def _large_cpu(x: Tensor, shape: tuple[int, ...]) -> bool:
    return (
        math.prod(shape) * x.element_size() >= _FRESH_MAPPING
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
    )


def _fresh_zeros(x: Tensor, shape: tuple[int, ...], fill: float) -> bool:
    """True when :func:`_filled` makes the output a fresh zero mapping."""
    return _large_cpu(x, shape) and fill == 0 and math.copysign(1.0, fill) > 0


# Guards RegionConv._spare: a check of its use count and the taking of it are one step.
_SPARE_LOCK = threading.Lock()
# glibc's largest dynamic mmap threshold: bigger allocations are always fresh mappings.
_FRESH_MAPPING = 32 << 20
# How many references a storage has (private; without it outputs are never reused).
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _eager(x: Tensor) -> bool:
    """True for an ordinary tensor outside tracing and compiling (where a reused buffer would be
    baked into the graph)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return type(x) in (Tensor, nn.Parameter)


# ---------------------------------------------------------------------------- channel sums
def channel_sum_conv(
    filter: Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    padding_mode: str = "zeros",
) -> nn.Module:
    """The per-window channel-sum op as an exact conv.

    For each window of the input and each kernel tap `k`, `sum_c filter[c, k] * window[c, k]`:
    the filter is multiplied elementwise with the window and summed over the channels only,
    giving `K = prod(kernel)` values per window. That is a conv with `K` output channels whose
    weight is `weight[k, c, j] = filter[c, j] if j == k else 0`, so every convtool form, count
    and check applies to it.

    Args:
        filter: `(C, kh, kw)` (or `(C, k)` / `(C, kd, kh, kw)` for 1-d / 3-d windows).
        stride, padding, dilation, padding_mode: the windows, as for `nn.Conv2d`.

    Returns:
        `nn.Conv{1,2,3}d(C, K, kernel, bias=False)`; output `(N, K, *out_spatial)`, channel
        `k` the tap in the kernel's C order (`i * kw + j` in 2-d).
    """
    if not isinstance(filter, Tensor) or not filter.is_floating_point():
        raise ConvtoolError("filter must be a floating-point tensor (C, kh, kw)")
    if filter.dim() not in (2, 3, 4):
        raise ConvtoolError(
            f"filter must have shape (C, kh, kw) (or (C, k) / (C, kd, kh, kw)), got "
            f"{tuple(filter.shape)}"
        )
    channels, kernel = filter.shape[0], tuple(filter.shape[1:])
    taps = math.prod(kernel)
    spec = ConvSpec.create(
        ndim=len(kernel),
        in_channels=channels,
        out_channels=taps,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=padding_mode,
        bias=False,
    )
    flat = filter.detach().reshape(channels, taps)
    eye = torch.eye(taps, dtype=filter.dtype, device=filter.device)
    weight = (eye[:, None, :] * flat[None, :, :]).reshape(taps, channels, *kernel)
    return build_conv(spec, weight.contiguous(), None)


__all__ = [
    "RegionConv",
    "channel_sum_conv",
    "parse_box",
    "region_counts",
    "region_matrix",
    "region_positions",
    "region_rows",
    "region_rows_for",
]
