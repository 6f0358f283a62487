"""Matrix-free conv operators, their singular values, and Lipschitz bounds.

:func:`linear_operator` wraps a conv layer as a SciPy `LinearOperator` whose `matvec` is the conv
(no bias) and whose `rmatvec` is its exact adjoint, computed by PyTorch without building `T`:

- a forward conv is a padding map followed by a zero-padded ("valid") conv. The valid conv's
  adjoint is `conv_transpose` (with the `output_padding` that restores the padded size); the
  padding map is a gather along each axis (a crop for zeros), whose adjoint scatter-adds back.
- a transposed conv's adjoint is the forward conv with the same weight, cropped to its input.

:func:`spectrum` picks the cheapest exact method that applies:

- ``fft``: circular padding, stride 1, output size = input size. The matrix is block-circulant,
  so the discrete Fourier transform block-diagonalises it: its singular values are those of the
  `C_out x C_in/groups` matrices of the kernel's DFT at every frequency (Sedghi et al. 2019).
- ``dense``: a small matrix, built dense (float64) and passed to `torch.linalg.svdvals`.
- ``svds``: Lanczos (ARPACK `eigsh`) on the Gram operator `A^T A` (or `A A^T`, the smaller side)
  through the matrix-free operator. The start vector for stride-1 convs is the top singular
  vector of the kernel's Fourier symbol, which cuts the iterations several times.
- ``bound``: when even that is too expensive (`max_work`), an upper bound on `sigma_max` only:
  the layer is a padding map `P` then a (strided) valid conv, which is a row subset of a circular
  conv on the padded grid, so `||T|| <= ||P|| * max_w sigma_max(K(w))`. The per-frequency norms
  are bounded by Gram iteration (Delattre et al. 2023), and a few power iterations give a lower
  bound, so the result says how tight the bound is.

Every value is float64. Accuracy: for ``svds`` each value `s` comes with the residual
`r = ||A^T u - s v||` of its singular triple (`u = A v / s`): a true singular value lies within
`r` of `s` (the eigenvalue residual bound on `[[0, A], [A^T, 0]]`), and the value is usually far
more accurate than that (its error is of order `r^2 / gap`). For ``dense`` and ``fft`` the
tolerance is a rounding-error estimate.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor, nn

from convtool.errors import ConvtoolError
from convtool.matrices import _axis_positions, matrix, tap_count
from convtool.resources import check_memory
from convtool.spec import ConvSpec

Which = Literal["largest", "smallest"]
METHODS = ("auto", "fft", "dense", "svds", "bound")

EPS = float(np.finfo(np.float64).eps)
DENSE_MAX_SIDE = 2048  # dense SVD up to min(m, n) = 2048 and max(m, n) <= 64 * that
DENSE_MAX_ENTRIES = 1 << 25  # 256 MiB of float64
DEFAULT_MAX_WORK = 5e11  # multiply-adds the Lanczos path may spend (~ a minute on 2 cores)
SMALLEST_MAX_SIDE = 200_000  # Lanczos for the smallest values converges too slowly beyond this
_LANCZOS_MATVECS = 300  # typical matvec + rmatvec pairs of one eigsh run, for the work estimate


# ----------------------------------------------------------------------------- the operator
def _pad_index(n: int, lo: int, hi: int, mode: str) -> Tensor:
    """Input index each of the `lo + n + hi` padded positions copies along one axis."""
    pos, _ = _axis_positions(n, n + lo + hi, 1, 1, 1, lo, mode)
    return pos[:, 0]


def _conv_fn(ndim: int, transposed: bool) -> Any:
    if transposed:
        return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[ndim - 1]
    return (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]


class ConvOperator(LinearOperator):
    """`T` of one conv layer as a matrix-free SciPy operator, in float64.

    `matvec(x)` with `x` of shape `(C_in * prod(spatial),)` is `layer(x) - bias` flattened;
    `rmatvec(y)` is `T^T y`, exact to rounding. `matmat` / `rmatmat` run a whole block of vectors
    as one batch. :meth:`apply` and :meth:`adjoint` do the same on torch tensors shaped
    `(N, C_in, *spatial)` and `(N, C_out, *out_spatial)`.

    Attributes:
        spec: the layer's hyperparameters.
        weight: float64 copy of the weight, as PyTorch stores it.
        input_shape: one sample `(C_in, *spatial)`.
        output_shape: one sample `(C_out, *out_spatial)`.
        matvecs: products computed so far (both directions), for cost accounting.
    """

    def __init__(self, spec: ConvSpec, weight: Tensor, input_shape: Sequence[int]) -> None:
        if tuple(weight.shape) != spec.weight_shape:
            raise ConvtoolError(
                f"weight has shape {tuple(weight.shape)} but {spec.describe()} needs "
                f"{spec.weight_shape}"
            )
        if weight.is_meta:
            raise ConvtoolError("the weight is on the meta device and holds no values; load it")
        self.spec = spec
        self.input_shape = spec.checked_sample(input_shape)
        self.output_shape = spec.output_shape(self.input_shape)
        self.weight = weight.detach().to(device="cpu", dtype=torch.float64)
        self.matvecs = 0
        self._conv = _conv_fn(spec.ndim, spec.transposed)
        self._adj = _conv_fn(spec.ndim, not spec.transposed)
        pads = spec.pad_pairs
        spatial = self.input_shape[1:]
        self._padded = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, pads, strict=True))
        self._gathers: list[Tensor] | None = None
        # zero padding, the same on both sides: the conv pads itself (no padded copy)
        self._own_pad = spec.padding_mode == "zeros" and all(lo == hi for lo, hi in pads)
        if not spec.transposed and spec.padding_mode != "zeros":
            self._gathers = [
                _pad_index(n, lo, hi, spec.padding_mode)
                for n, (lo, hi) in zip(spatial, pads, strict=True)
            ]
        super().__init__(
            dtype=np.float64, shape=(math.prod(self.output_shape), math.prod(self.input_shape))
        )

    # -- torch side
    def _pad(self, x: Tensor) -> Tensor:
        """The padding map: `(N, C, *spatial)` -> `(N, C, *padded)`."""
        if self._gathers is None:
            flat = [p for lo, hi in reversed(self.spec.pad_pairs) for p in (lo, hi)]
            return F.pad(x, flat) if any(flat) else x
        for axis, idx in enumerate(self._gathers):
            x = x.index_select(2 + axis, idx)
        return x

    def _unpad(self, g: Tensor) -> Tensor:
        """Adjoint of :meth:`_pad`: a crop for zeros, else a scatter-add per axis."""
        spatial = self.input_shape[1:]
        if self._gathers is None:
            for axis, ((lo, _), n) in enumerate(zip(self.spec.pad_pairs, spatial, strict=True)):
                g = g.narrow(2 + axis, lo, n)
            return g
        for axis in reversed(range(self.spec.ndim)):
            shape = list(g.shape)
            shape[2 + axis] = spatial[axis]
            g = g.new_zeros(shape).index_add_(2 + axis, self._gathers[axis], g)
        return g

    def apply(self, x: Tensor) -> Tensor:
        """`T x` for a batch: `(N, C_in, *spatial)` -> `(N, C_out, *out_spatial)` (no bias)."""
        s = self.spec
        self.matvecs += x.shape[0]
        if s.transposed:
            return self._conv(
                x, self.weight, None, s.stride, s.padding, s.output_padding, s.groups, s.dilation
            )
        if self._own_pad:
            pad = tuple(lo for lo, _ in s.pad_pairs)
            return self._conv(x, self.weight, None, s.stride, pad, s.dilation, s.groups)
        return self._conv(self._pad(x), self.weight, None, s.stride, 0, s.dilation, s.groups)

    def adjoint(self, y: Tensor) -> Tensor:
        """`T^T y` for a batch: `(N, C_out, *out_spatial)` -> `(N, C_in, *spatial)`."""
        s = self.spec
        self.matvecs += y.shape[0]
        if s.transposed:
            x = self._adj(y, self.weight, None, s.stride, s.padding, s.dilation, s.groups)
            for axis, n in enumerate(self.input_shape[1:]):  # rows past the input: dropped
                x = x.narrow(2 + axis, 0, n)
            return x
        out_sp = self.output_shape[1:]
        # conv_transpose gives (m - 1) * s + d * (k - 1) + 1 + op; op restores the padded size.
        extra = tuple(
            p - ((m - 1) * st + d * (k - 1) + 1)
            for p, m, st, d, k in zip(
                self._padded, out_sp, s.stride, s.dilation, s.kernel_size, strict=True
            )
        )
        if self._own_pad:  # conv_transpose's padding crops exactly what the conv padded
            pad = tuple(lo for lo, _ in s.pad_pairs)
            return self._adj(y, self.weight, None, s.stride, pad, extra, s.groups, s.dilation)
        g = self._adj(y, self.weight, None, s.stride, 0, extra, s.groups, s.dilation)
        return self._unpad(g)

    # -- scipy side
    def _batch(self, v: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        arr = np.ascontiguousarray(np.asarray(v, dtype=np.float64))
        # a vector is a batch of one; a block's columns (n, b) become rows (b, n)
        arr = arr[None] if arr.ndim == 1 else np.ascontiguousarray(arr.T)
        return torch.from_numpy(arr).view(-1, *shape)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        y = self.apply(self._batch(np.ravel(x), self.input_shape))
        return y.reshape(-1).numpy()

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        x = self.adjoint(self._batch(np.ravel(y), self.output_shape))
        return x.reshape(-1).numpy()

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        y = self.apply(self._batch(x, self.input_shape))
        return y.reshape(y.shape[0], -1).numpy().T

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        x = self.adjoint(self._batch(y, self.output_shape))
        return x.reshape(x.shape[0], -1).numpy().T


def operator_from_weight(
    spec: ConvSpec, weight: Tensor, input_shape: Sequence[int]
) -> ConvOperator:
    """:class:`ConvOperator` of a spec and its weight (the bias plays no part)."""
    if not weight.is_floating_point():
        raise ConvtoolError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    return ConvOperator(spec, weight, input_shape)


def _layer_weight(layer: nn.Module) -> tuple[ConvSpec, Tensor]:
    spec = ConvSpec.from_module(layer)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor):
        raise ConvtoolError(f"{type(layer).__name__} has no weight tensor")
    return spec, weight


def linear_operator(layer: nn.Module, input_shape: Sequence[int]) -> ConvOperator:
    """The conv layer's matrix `T` as a matrix-free `scipy.sparse.linalg.LinearOperator`.

    Args:
        layer: `nn.Conv1d/2d/3d` or `nn.ConvTranspose1d/2d/3d`, any hyperparameters.
        input_shape: one sample `(C_in, *spatial)` (a leading batch dim is accepted).

    Returns:
        A float64 operator of shape `(C_out * prod(out_spatial), C_in * prod(spatial))`:
        `matvec` is the conv without bias, `rmatvec` its exact adjoint `T^T`.
    """
    spec, weight = _layer_weight(layer)
    return operator_from_weight(spec, weight, input_shape)


# ----------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class Spectrum:
    """Singular values of one conv layer's matrix, and how they were obtained.

    Attributes:
        values: the `k` largest (or smallest) singular values, descending, float64; for
            ``method='bound'`` one value, an upper bound on `sigma_max`.
        which: 'largest' or 'smallest'.
        method: 'fft', 'dense', 'svds' or 'bound'.
        exact: True when `values` are singular values (to `tolerance`); False for a bound.
        tolerance: absolute error bound of each value (see the module docstring).
        residuals: per-value residual bounds (``svds``), else None.
        shape: `(rows, cols)` of `T`.
        seconds: wall time of the computation.
        all_values: every singular value, descending, when the method computed them all.
        upper_bound / lower_bound: rigorous bounds on `sigma_max` when computed (``bound``).
        matvecs: operator products spent (``svds``, ``bound``).
        note: why this method, in words.
    """

    values: np.ndarray
    which: str
    method: str
    exact: bool
    tolerance: float
    shape: tuple[int, int]
    seconds: float
    residuals: np.ndarray | None = None
    all_values: np.ndarray | None = field(default=None, repr=False)
    upper_bound: float | None = None
    lower_bound: float | None = None
    matvecs: int = 0
    note: str = ""

    @property
    def count(self) -> int:
        """How many singular values `T` has: `min(rows, cols)`."""
        return min(self.shape)

    @property
    def sigma_max(self) -> float | None:
        """The largest singular value (an upper bound for ``method='bound'``), when known."""
        if self.all_values is not None:
            return float(self.all_values[0])
        if self.which == "largest" and len(self.values):
            return float(self.values[0])
        return None

    @property
    def sigma_min(self) -> float | None:
        """The smallest of the `min(rows, cols)` singular values, when known."""
        if self.all_values is not None:
            return float(self.all_values[-1])
        if self.which == "smallest" and len(self.values):
            return float(self.values[-1])
        return None

    @property
    def norm_bound(self) -> float | None:
        """A number `>= sigma_max` (value plus its tolerance, or the bound), when known."""
        if self.upper_bound is not None:
            return self.upper_bound
        top = self.sigma_max
        return None if top is None else top + self.tolerance

    @property
    def relative_tolerance(self) -> float:
        top = self.sigma_max if self.sigma_max is not None else float(np.max(self.values))
        return self.tolerance / top if top else self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": [float(v) for v in self.values],
            "which": self.which,
            "method": self.method,
            "exact": self.exact,
            "sigma_max": self.sigma_max,
            "sigma_min": self.sigma_min,
            "tolerance": self.tolerance,
            "upper_bound": self.upper_bound,
            "lower_bound": self.lower_bound,
            "matrix_shape": list(self.shape),
            "seconds": self.seconds,
            "matvecs": self.matvecs,
            "note": self.note,
        }


# ----------------------------------------------------------------------------- Fourier symbol
def fft_applies(spec: ConvSpec, input_shape: Sequence[int]) -> bool:
    """True when `T` is block-circulant: circular padding, stride 1, output size = input size."""
    if spec.transposed or spec.padding_mode != "circular" or any(s != 1 for s in spec.stride):
        return False
    sample = spec.checked_sample(input_shape)
    return spec.output_shape(sample)[1:] == sample[1:]


def _symbol(spec: ConvSpec, weight: Tensor, grid: Sequence[int], shifts: Sequence[int]) -> Tensor:
    """The kernel's DFT on `grid`: `(*grid, groups, C_out/g, C_in/g)` complex128.

    Tap `j` of axis `i` sits at `(j * dilation - shift) mod grid[i]` (taps that wrap onto one
    position add up), which is the circular cross-correlation's kernel. The DFT of a
    cross-correlation's kernel is the conjugate of its symbol; singular values do not care.
    """
    # A transposed conv's weight (C_in, C_out/g, *k) read as (out, in/g, *k) is the forward conv
    # whose adjoint the layer is; the adjoint has the same singular values.
    big = weight.detach().to(device="cpu", dtype=torch.float64)
    for axis, (n, k, d, sh) in enumerate(
        zip(grid, spec.kernel_size, spec.dilation, shifts, strict=True)
    ):
        idx = (torch.arange(k, dtype=torch.int64) * d - sh).remainder(n)
        shape = list(big.shape)
        shape[2 + axis] = n
        big = big.new_zeros(shape).index_add_(2 + axis, idx, big)
    spatial = tuple(range(2, 2 + spec.ndim))
    sym = torch.fft.fftn(big, dim=spatial)
    g = spec.groups
    cout, cin_g = sym.shape[0], sym.shape[1]
    sym = sym.reshape(g, cout // g, cin_g, *grid)
    return sym.permute(*range(3, 3 + spec.ndim), 0, 1, 2)


def _fft_values(spec: ConvSpec, weight: Tensor, sample: tuple[int, ...]) -> np.ndarray:
    grid = sample[1:]
    shifts = [lo for lo, _ in spec.pad_pairs]
    sym = _symbol(spec, weight, grid, shifts)
    vals = torch.linalg.svdvals(sym).reshape(-1)
    return np.sort(vals.numpy())[::-1].copy()


# ----------------------------------------------------------------------------- upper bounds
def gram_norm_bound(mats: Tensor, iterations: int = 8) -> Tensor:
    """Upper bounds on the spectral norms of a batch of matrices by Gram iteration.

    `||G_t||_F ** (1 / 2**t) >= sigma_max` with `G_0 = M`, `G_{t+1} = G_t^H G_t`
    (Delattre et al. 2023); it converges to `sigma_max` super-linearly. Rescaling each step
    keeps it finite.

    Args:
        mats: `(..., m, n)` real or complex.
        iterations: Gram steps `t`.

    Returns:
        `(...)` float64 bounds.
    """
    g = mats.to(torch.complex128)
    norm = torch.linalg.matrix_norm(g).clamp_min(1e-300)
    log_c = torch.log(norm)
    g = g / norm[..., None, None]
    for _ in range(iterations):
        g = g.mH @ g
        norm = torch.linalg.matrix_norm(g).clamp_min(1e-300)
        g = g / norm[..., None, None]
        log_c = 2 * log_c + torch.log(norm)
    return torch.exp(log_c / 2**iterations).real.to(torch.float64)


def padding_norm(spec: ConvSpec, input_shape: Sequence[int]) -> float:
    """`||P||` of the padding map: 1 for zeros, else sqrt of the most copies of one element.

    Each padded position copies exactly one input element, so `P^T P` is diagonal (per axis)
    and holds how many times each element is copied.
    """
    if spec.transposed or spec.padding_mode == "zeros":
        return 1.0
    sample = spec.checked_sample(input_shape)
    norm = 1.0
    for n, (lo, hi) in zip(sample[1:], spec.pad_pairs, strict=True):
        counts = torch.bincount(_pad_index(n, lo, hi, spec.padding_mode), minlength=n)
        norm *= math.sqrt(int(counts.max()))
    return norm


def _embedding_grid(spec: ConvSpec, sample: tuple[int, ...]) -> tuple[int, ...]:
    """The padded grid on which the layer's valid conv is a row subset of a circular conv."""
    if spec.transposed:  # the forward conv runs on the transposed conv's (padded) output
        out = spec.output_shape(sample)
        return tuple(n + 2 * p for n, (p, _) in zip(out[1:], spec.pad_pairs, strict=True))
    return tuple(n + lo + hi for n, (lo, hi) in zip(sample[1:], spec.pad_pairs, strict=True))


def bound_bytes(spec: ConvSpec, input_shape: Sequence[int]) -> int:
    """Memory of the Fourier symbol the ``bound`` method builds (complex128, 3 copies)."""
    sample = spec.checked_sample(input_shape)
    grid = _embedding_grid(spec, sample)
    per = spec.out_channels * spec.in_channels // spec.groups
    return 3 * 16 * math.prod(grid) * per


def _norm_upper_bound(
    spec: ConvSpec, weight: Tensor, sample: tuple[int, ...], iterations: int
) -> float:
    grid = _embedding_grid(spec, sample)
    sym = _symbol(spec, weight, grid, [0] * spec.ndim)
    mats = sym.reshape(-1, *sym.shape[-2:])
    if mats.shape[-2] < mats.shape[-1]:  # iterate on the smaller Gram matrix
        mats = mats.mH
    top = float(gram_norm_bound(mats, iterations).max())
    return top * padding_norm(spec, sample)


# ----------------------------------------------------------------------------- Lanczos
def _start_vector(op: ConvOperator, gram_on_input: bool) -> np.ndarray:
    """A start vector close to the top singular vector, or a seeded random one.

    For a stride-1 forward conv the top right singular vector is close to a plane wave at the
    frequency where the kernel's symbol peaks, times the top singular vector of the symbol there
    (under a half-sine window for zero padding, whose top modes vanish at the border).
    """
    spec = op.spec
    sample = op.input_shape
    rng = np.random.default_rng(0)
    x0: Tensor | None = None
    if not spec.transposed and all(s == 1 for s in spec.stride):
        # The symbol is smooth: a coarse frequency grid finds its peak well enough for a start
        # (any frequency makes a valid plane wave), at a small fraction of the full grid's cost.
        grid = tuple(
            max(d * (k - 1) + 1, min(n, 16))
            for n, k, d in zip(sample[1:], spec.kernel_size, spec.dilation, strict=True)
        )
        sym = _symbol(spec, op.weight, grid, [0] * spec.ndim)
        flat = sym.reshape(-1, *sym.shape[-3:])  # (freq, groups, out/g, in/g)
        top = torch.linalg.svdvals(flat)[..., 0].reshape(-1)
        freq, group = divmod(int(top.argmax()), spec.groups)
        v = torch.linalg.svd(flat[freq, group])[2][0]  # (C_in/g,) top row of V^H
        coords = np.unravel_index(freq, grid)
        phase = torch.ones((), dtype=torch.complex128)
        for axis, (n, f, size) in enumerate(zip(sample[1:], coords, grid, strict=True)):
            i = torch.arange(n, dtype=torch.float64)
            wave = torch.exp(-2j * math.pi * float(f) * i / size)
            if spec.padding_mode == "zeros":
                wave = wave * torch.sin(math.pi * (i + 1) / (n + 1))
            view = [1] * spec.ndim
            view[axis] = n
            phase = phase * wave.view(view)
        x = torch.zeros(sample, dtype=torch.complex128)
        cin_g = spec.in_channels // spec.groups
        x[group * cin_g : (group + 1) * cin_g] = v.view(-1, *([1] * spec.ndim)) * phase
        x0 = x.real.contiguous()
        x0 = x0 + 1e-3 * float(x0.abs().max()) * torch.from_numpy(rng.standard_normal(sample))
    if x0 is None:
        side = op.shape[1] if gram_on_input else op.shape[0]
        return rng.standard_normal(side)
    flat_x = x0.reshape(-1).numpy()
    return flat_x if gram_on_input else op.matvec(flat_x)


def _triples(
    op: ConvOperator, vecs: np.ndarray, gram_on_input: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Singular values from Gram eigenvectors, and their residuals (see module docstring)."""
    vecs = vecs / np.linalg.norm(vecs, axis=0, keepdims=True)
    if gram_on_input:
        image = op.matmat(vecs)  # A v
        sig = np.linalg.norm(image, axis=0)
        u = image / np.where(sig > 0, sig, 1.0)
        res = np.linalg.norm(op.rmatmat(u) - sig * vecs, axis=0)
    else:
        image = op.rmatmat(vecs)  # A^T u
        sig = np.linalg.norm(image, axis=0)
        v = image / np.where(sig > 0, sig, 1.0)
        res = np.linalg.norm(op.matmat(v) - sig * vecs, axis=0)
    return sig, res


def _eigsh(gram: LinearOperator, k: int, tol: float, v0: np.ndarray) -> Any:
    """The `k` largest eigenpairs of a symmetric operator (ARPACK)."""
    try:
        return eigsh(gram, k=k, which="LA", tol=tol, v0=v0, maxiter=max(1000, 10 * k))
    except ArpackNoConvergence as exc:
        raise ConvtoolError(
            f"the Lanczos iteration did not converge for k={k}; try a smaller k, a smaller "
            f"input_shape, or method='bound'"
        ) from exc


def _svds(op: ConvOperator, k: int, which: str, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Singular triples by Lanczos on the Gram operator `G` of the smaller side.

    The largest values are the top of `G`; the smallest are the top of `c I - G` with
    `c >= ||G||`, so ARPACK's stopping test (relative to the eigenvalue it converges to) stays
    meaningful even when `sigma_min` is ~0. Values near 0 are then resolved to about
    `sqrt(tol) * sigma_max` (squaring in `G`), which the residuals report.
    """
    rows, cols = op.shape
    on_input = cols <= rows
    side = cols if on_input else rows

    def gram_mv(v: np.ndarray) -> Any:
        v = np.ravel(v)
        return op.rmatvec(op.matvec(v)) if on_input else op.matvec(op.rmatvec(v))

    gram = LinearOperator((side, side), matvec=gram_mv, dtype=float)
    rng = np.random.default_rng(0)
    if which == "largest":
        # On conv spectra (clustered tops) ARPACK's tol = tol gives values accurate to about
        # tol (benchmarks/spectrum.py); the residuals below are the rigorous statement.
        arpack_tol, shift = min(1e-2, tol), 0.0
        top = gram
        v0 = _start_vector(op, on_input)
    else:
        est, _ = _eigsh(gram, 1, 1e-3, rng.standard_normal(side))
        shift = 1.1 * float(est[0]) + 1e-300
        arpack_tol = tol
        top = LinearOperator((side, side), matvec=lambda v: shift * np.ravel(v) - gram_mv(v))
        v0 = rng.standard_normal(side)
    vals, vecs = _eigsh(top, k, arpack_tol, v0)
    if k > 1:
        # Single-vector Lanczos sees one vector of a repeated eigenvalue (conv spectra have many
        # pairs): move what was found below everything and look again until nothing is missed.
        floor = -abs(shift) - float(vals.max())
        for _ in range(k):
            found_v, found_l = vecs, vals

            def deflated(v: np.ndarray, fv: np.ndarray = found_v, fl: np.ndarray = found_l) -> Any:
                v = np.ravel(v)
                return top.matvec(v) + fv @ ((floor - fl) * (fv.T @ v))

            defl = LinearOperator((side, side), matvec=deflated, dtype=float)
            v0 = rng.standard_normal(side)
            extra, evec = _eigsh(defl, 1, arpack_tol, v0 - found_v @ (found_v.T @ v0))
            if extra[0] <= vals.min() + 1e-10 * abs(vals).max():
                break
            vals, vecs = np.append(vals, extra), np.hstack([vecs, evec])
            keep = np.argsort(vals)[::-1][:k]
            vals, vecs = vals[keep], vecs[:, keep]
    sig, res = _triples(op, vecs, on_input)
    order = np.argsort(sig)[::-1]
    return sig[order], res[order]


# ----------------------------------------------------------------------------- spectrum
def _dense_fits(shape: tuple[int, int], which: str = "largest") -> bool:
    # Lanczos is slow for the smallest values (they cluster near 0): dense goes further there.
    side = DENSE_MAX_SIDE if which == "largest" else 2 * DENSE_MAX_SIDE
    return min(shape) <= side and shape[0] * shape[1] <= DENSE_MAX_ENTRIES


def _check_args(k: int, which: str, method: str, tol: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConvtoolError(f"k must be a positive int, got {k!r}")
    if which not in ("largest", "smallest"):
        raise ConvtoolError(f"which must be 'largest' or 'smallest', got {which!r}")
    if method not in METHODS:
        raise ConvtoolError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (0 < tol < 1):
        raise ConvtoolError(f"tol must be in (0, 1), got {tol!r}")


def choose_method(
    spec: ConvSpec,
    input_shape: Sequence[int],
    k: int = 5,
    which: str = "largest",
    *,
    max_work: float = DEFAULT_MAX_WORK,
) -> tuple[str, str]:
    """The method ``method='auto'`` uses, and why (no numerical work)."""
    sample = spec.checked_sample(input_shape)
    rows, cols = math.prod(spec.output_shape(sample)), math.prod(sample)
    if fft_applies(spec, sample):
        return "fft", "circular padding, stride 1: block-circulant, every value by FFT"
    if _dense_fits((rows, cols), which):
        return "dense", f"small matrix ({rows} x {cols}): dense SVD"
    work = 2 * tap_count(spec, sample) * _LANCZOS_MATVECS * max(1, k / 5)
    if which == "largest" and work > max_work:
        return "bound", (
            f"Lanczos would take ~{work:.1e} multiply-adds (max_work={max_work:.1e}): "
            f"upper bound only"
        )
    return "svds", f"Lanczos on the matrix-free Gram operator ({rows} x {cols})"


def spectrum_for(
    spec: ConvSpec,
    weight: Tensor,
    input_shape: Sequence[int],
    k: int = 5,
    which: str = "largest",
    *,
    method: str = "auto",
    tol: float = 1e-6,
    max_work: float = DEFAULT_MAX_WORK,
    gram_iterations: int = 8,
) -> Spectrum:
    """:func:`spectrum` for a spec and its weight."""
    _check_args(k, which, method, tol)
    if not weight.is_floating_point():
        raise ConvtoolError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ConvtoolError("the weight has NaN/inf values; singular values are undefined")
    sample = spec.checked_sample(input_shape)
    shape = (math.prod(spec.output_shape(sample)), math.prod(sample))
    note = ""
    if method == "auto":
        method, note = choose_method(spec, sample, k, which, max_work=max_work)
    count = min(shape)
    # Refusals first: nothing below has started any work.
    if method == "fft" and not fft_applies(spec, sample):
        raise ConvtoolError(
            "method='fft' needs circular padding, stride 1 and an output as large as the input "
            f"(padding='same'); {spec.describe()} on {sample} is not block-circulant"
        )
    if method == "dense" and shape[0] * shape[1] > 8 * DENSE_MAX_ENTRIES:
        raise ConvtoolError(
            f"method='dense' would build a {shape[0]} x {shape[1]} matrix; use method='svds'"
        )
    if method == "bound" and which == "smallest":
        raise ConvtoolError("method='bound' bounds sigma_max only; use which='largest'")
    if method == "svds":
        if k >= count - 1:
            raise ConvtoolError(
                f"k={k} is too large for Lanczos on a matrix with {count} singular values; use "
                f"method='dense' or k < {count - 1}"
            )
        if which == "smallest" and count > SMALLEST_MAX_SIDE:
            raise ConvtoolError(
                f"the smallest singular values of a {shape[0]} x {shape[1]} matrix converge too "
                f"slowly (more than {SMALLEST_MAX_SIDE} values); use a smaller input_shape"
            )
    if method == "bound":
        check_memory(
            bound_bytes(spec, sample),
            "the Fourier symbol of the bound",
            "use a smaller input_shape",
        )

    started = time.perf_counter()
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    k_eff = min(k, count)
    if method in ("fft", "dense"):
        if method == "fft":
            all_vals = _fft_values(spec, w, sample)
            # DFT rounding: ~ eps * log2(P) per symbol entry, then a backward-stable small SVD.
            scale = math.log2(max(2, math.prod(sample[1:]))) + max(spec.weight_shape[:2])
        else:
            t = matrix(spec, w, sample)
            all_vals = torch.linalg.svdvals(t).numpy().copy()
            scale = max(shape)
        tolerance = 4 * EPS * scale * float(all_vals[0]) if len(all_vals) else 0.0
        values = all_vals[:k_eff] if which == "largest" else all_vals[-k_eff:]
        return Spectrum(
            values=values.copy(),
            which=which,
            method=method,
            exact=True,
            tolerance=tolerance,
            shape=shape,
            seconds=time.perf_counter() - started,
            all_values=all_vals,
            note=note,
        )
    op = ConvOperator(spec, w, sample)
    if method == "bound":
        upper = _norm_upper_bound(spec, w, sample, gram_iterations)
        x = _start_vector(op, True)
        for _ in range(10):  # power iterations: ||A x|| / ||x|| never exceeds sigma_max
            x = op.rmatvec(op.matvec(x))
            x /= np.linalg.norm(x)
        lower = float(np.linalg.norm(op.matvec(x)))
        return Spectrum(
            values=np.array([upper]),
            which=which,
            method="bound",
            exact=False,
            tolerance=upper - lower,
            shape=shape,
            seconds=time.perf_counter() - started,
            upper_bound=upper,
            lower_bound=lower,
            matvecs=op.matvecs,
            note=note or "upper bound by Gram iteration on the circulant embedding",
        )
    sig, res = _svds(op, k_eff, which, tol)
    return Spectrum(
        values=sig,
        which=which,
        method="svds",
        exact=True,
        tolerance=float(res.max()),
        shape=shape,
        seconds=time.perf_counter() - started,
        residuals=res,
        matvecs=op.matvecs,
        note=note,
    )


def spectrum(
    layer: nn.Module,
    input_shape: Sequence[int],
    k: int = 5,
    which: str = "largest",
    *,
    method: str = "auto",
    tol: float = 1e-6,
    max_work: float = DEFAULT_MAX_WORK,
    gram_iterations: int = 8,
) -> Spectrum:
    """The `k` largest (or smallest) singular values of a conv layer's matrix `T`.

    Args:
        layer: `nn.Conv1d/2d/3d` or `nn.ConvTranspose1d/2d/3d`, any hyperparameters.
        input_shape: one sample `(C_in, *spatial)` (a leading batch dim is accepted).
        k: how many values.
        which: 'largest' or 'smallest' (of the `min(rows, cols)` singular values).
        method: 'auto' (see the module docstring), or force 'fft', 'dense', 'svds', 'bound'.
        tol: relative accuracy wanted from the Lanczos path.
        max_work: multiply-adds the Lanczos path may spend before 'auto' settles for a bound.
        gram_iterations: Gram steps of the bound.

    Returns:
        A :class:`Spectrum`: `.values` descending, `.method`, `.tolerance`, `.seconds`, ...
    """
    spec, weight = _layer_weight(layer)
    return spectrum_for(
        spec,
        weight,
        input_shape,
        k,
        which,
        method=method,
        tol=tol,
        max_work=max_work,
        gram_iterations=gram_iterations,
    )


# ----------------------------------------------------------------------------- many layers
@dataclass(frozen=True)
class LayerSpectrum:
    """One layer's singular values: the largest (always) and the smallest (when asked).

    Attributes:
        name: the layer's name in its model (or the kernel file's stem).
        kind: PyTorch class name, e.g. 'Conv2d'.
        input_shape: one sample `(C_in, *spatial)`.
        largest: the `k` largest values (or a bound on `sigma_max`).
        smallest: the `k` smallest values, or None.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    largest: Spectrum
    smallest: Spectrum | None = None

    @property
    def sigma_max(self) -> float | None:
        return self.largest.sigma_max

    @property
    def sigma_min(self) -> float | None:
        if self.smallest is not None:
            return self.smallest.sigma_min
        return self.largest.sigma_min if self.largest.all_values is not None else None

    @property
    def condition(self) -> float | None:
        """`sigma_max / sigma_min` (inf when `sigma_min` is 0), when both are known."""
        top, low = self.sigma_max, self.sigma_min
        if top is None or low is None:
            return None
        return math.inf if low <= 0 else top / low

    @property
    def seconds(self) -> float:
        return self.largest.seconds + (self.smallest.seconds if self.smallest else 0.0)

    def to_dict(self) -> dict[str, Any]:
        values = [float(v) for v in self.largest.values]
        return {
            "name": self.name,
            "type": self.kind,
            "input_shape": list(self.input_shape),
            "matrix_shape": list(self.largest.shape),
            "sigma_max": self.sigma_max,
            "sigma_min": self.sigma_min,
            "condition": self.condition,
            "norm_bound": self.largest.norm_bound,
            "values": values,
            "smallest_values": (
                [float(v) for v in self.smallest.values] if self.smallest is not None else None
            ),
            "method": self.largest.method,
            "exact": self.largest.exact,
            "tolerance": self.largest.tolerance,
            "upper_bound": self.largest.upper_bound,
            "lower_bound": self.largest.lower_bound,
            "seconds": self.seconds,
            "note": self.largest.note,
        }


LIPSCHITZ_NOTE = (
    "upper bound: product of the listed conv layers' norms, valid for a chain of these convs "
    "joined by 1-Lipschitz maps (ReLU, tanh, max-pool, ...); other layers (linear, batch norm, "
    "residual sums) are not included"
)


@dataclass
class SpectrumReport:
    """Singular values of several conv layers and the product bound on their composition.

    Attributes:
        layers: one :class:`LayerSpectrum` per layer, in order.
        notes: things the reader should know (layers left out, ...).
    """

    layers: list[LayerSpectrum]
    notes: list[str] = field(default_factory=list)

    @property
    def lipschitz_bound(self) -> float | None:
        """Product of each layer's `norm_bound` (None if a layer has none)."""
        bounds = [layer.largest.norm_bound for layer in self.layers]
        if not bounds or any(b is None for b in bounds):
            return None
        return float(math.prod(b for b in bounds if b is not None))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "lipschitz_bound": self.lipschitz_bound,
            "lipschitz_note": LIPSCHITZ_NOTE,
            "notes": list(self.notes),
        }


def layer_spectrum(
    name: str,
    spec: ConvSpec,
    weight: Tensor,
    input_shape: Sequence[int],
    k: int = 5,
    *,
    smallest: bool = False,
    method: str = "auto",
    tol: float = 1e-6,
    max_work: float = DEFAULT_MAX_WORK,
) -> LayerSpectrum:
    """The largest (and with `smallest`, the smallest) `k` singular values of one layer."""
    sample = spec.checked_sample(input_shape)
    top = spectrum_for(
        spec, weight, sample, k, "largest", method=method, tol=tol, max_work=max_work
    )
    low = None
    if smallest:
        if top.all_values is not None:  # already computed every value
            low = dataclasses.replace(
                top, values=top.all_values[-min(k, len(top.all_values)) :].copy(), which="smallest"
            )
        else:
            low = spectrum_for(
                spec,
                weight,
                sample,
                k,
                "smallest",
                method="auto" if method == "bound" else method,
                tol=tol,
                max_work=max_work,
            )
    return LayerSpectrum(name, spec.kind, sample, top, low)
