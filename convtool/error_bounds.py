"""How far a conv computed in floating point may be from the exact result: the default tolerance.

Every form convtool emits computes each output element as a dot product of `n` taps plus a bias,
`y_i = sum_j w_j x_j + b` with `n = C_in / groups * prod(kernel_size)` (padding taps are zero
and add nothing; reflect/circular padding may first merge a few taps of one column in `T`,
which costs at most one rounding per merged tap, so no term sees more than `n + 2` roundings).
The forms differ only in the *order* of the additions (dense GEMM blocks, CSR rows, LC's batched
products), so a tolerance that is right for one form and one length cannot be right for all:
the error grows with `n` and with the magnitudes of the terms, not with `|y_i|` (which can be
tiny through cancellation). The bounds here follow from standard error analysis, with `u` the
unit roundoff (`2**-24` in float32, `2**-53` in float64):

- **Worst case** (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5,
  any summation order): `|fl(y_i) - y_i| <= gamma_{n+2} * S_i`, `gamma_k = k u / (1 - k u)`,
  `S_i = sum_j |w_j x_j| + |b|`. Rigorous, but it grows like `n u S_i` while real errors grow
  like `sqrt(n) u`: at `n = 65,536` it passes errors a thousand times the real ones.
- **Probabilistic** (Higham & Mary, *A new approach to probabilistic rounding error analysis*,
  SIAM J. Sci. Comput. 41(5), 2019, Thm 3.1; rounding errors independent and mean zero):
  `|fl(y_i) - y_i| <= lambda sqrt(n + 2) u S_i`, failing with probability at most
  `2 (n + 2) exp(-lambda^2 (1 - u)^2 / 2)`.
- **Random inputs**. verify's random inputs are symmetric and independent, so the signs of the
  terms `w_j x_j` are independent coin flips. By Hoeffding, every partial sum of any subset
  stays below `lambda R_i` with `R_i = sqrt(sum_j (w_j x_j)^2 + b^2)`, except with probability
  `2 exp(-lambda^2 / 2)`; the rounding error `sum_k delta_k s_k` of the partial sums `s_k` then
  stays below `lambda u sqrt(sum_k s_k^2) <= lambda^2 sqrt(n + 2) u R_i` (`R_i ~ S_i /
  sqrt(n)`, so this is about `sqrt(n)` times tighter than the line above for long products).

For a random input the bound used is the smaller of the last two; for the all-ones and zero
inputs (signs not random, and equal terms can make rounding errors correlated) it is the
worst-case one. `lambda = 6` puts the failure probability of the probabilistic statements
below `2 (n + 2) e^-18 ~ 2e-3` for `n = 65,536` per element; in practice the observed errors
stay far below (see ``benchmarks/verify_bounds.py``: the largest ratio error / bound measured
over lengths 9 .. 65,536 and every form is printed there). The reference is computed in float64
from the same (float32-valued) weights and inputs; its own error is bounded the same way with
`u = 2**-53` and added, so a float64 candidate is allowed twice the float64 bound.

This is what a 1e-3 relative change of one kernel entry must beat to be caught: it shifts
`y_i` by `1e-3 |w_j x_j|`, while the bound is about `lambda^2 sqrt(n) u R_i`; in float32 that is
caught for products up to a few thousand taps (see the tests), and no per-element test can see
it in a 65,536-term float32 sum, whose own rounding error is that large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from convtool.spec import ConvSpec, build_conv

__all__ = [
    "LAMBDA",
    "BoundTerms",
    "bound_description",
    "conv_bound_terms",
    "dot_length",
    "elementwise_bound",
    "unit_roundoff",
]

LAMBDA = 6.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """`u`: half the distance from 1 to the next float (2**-24 for float32, 2**-53 float64)."""
    return float(torch.finfo(dtype).eps) / 2


def dot_length(spec: ConvSpec) -> int:
    """Terms of one output element's dot product: `C_in / groups * prod(kernel_size)`."""
    return max(1, spec.in_channels // spec.groups * spec.kernel_numel)


@dataclass(frozen=True)
class BoundTerms:
    """The float64 reference output and the magnitudes the bounds scale with.

    Attributes:
        expected: the exact-as-float64 output `(K, *out)`.
        abs_sum: `S_i = sum_j |w_j x_j| + |b|`, `(K, *out)`.
        root_sum_sq: `R_i = sqrt(sum_j (w_j x_j)^2 + b^2)`, `(K, *out)`.
        n: dot-product length.
    """

    expected: Tensor
    abs_sum: Tensor
    root_sum_sq: Tensor
    n: int


def conv_bound_terms(spec: ConvSpec, weight: Tensor, bias: Tensor | None, x: Tensor) -> BoundTerms:
    """Run the conv three times in float64: on `x` with `w`, on `|x|` with `|w|`, on `x^2`
    with `w^2` (the padding map commutes with elementwise functions, so padding modes hold).

    Args:
        spec: the layer.
        weight, bias: its tensors, in the dtype the candidate uses.
        x: the inputs `(K, C_in, *spatial)`, in the dtype the candidate uses.
    """
    w, x64 = weight.detach().to(torch.float64), x.to(torch.float64)
    b = None if bias is None else bias.detach().to(torch.float64)

    def run(wt: Tensor, bt: Tensor | None, xt: Tensor) -> Tensor:
        conv = build_conv(spec, wt.clone(), None if bt is None else bt.clone()).eval()
        with torch.no_grad():
            out: Tensor = conv(xt)
        return out

    expected = run(w, b, x64)
    abs_sum = run(w.abs(), None if b is None else b.abs(), x64.abs())
    sq = run(w * w, None if b is None else b * b, x64 * x64)
    return BoundTerms(expected, abs_sum, sq.clamp_min(0).sqrt(), dot_length(spec))


def _gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u) if k * u < 1 else math.inf


def elementwise_bound(terms: BoundTerms, dtype: torch.dtype, random: Tensor) -> Tensor:
    """Largest allowed `|candidate - expected|` per element, `(K, *out)`.

    Args:
        terms: from :func:`conv_bound_terms`.
        dtype: the candidate's dtype.
        random: `(K,)` bools, True for inputs with random symmetric entries.
    """
    k = terms.n + 2
    view = (-1,) + (1,) * (terms.expected.dim() - 1)
    rand = random.view(view)

    def one(u: float) -> Tensor:
        worst = _gamma(k, u) * terms.abs_sum
        probabilistic = torch.minimum(
            LAMBDA * math.sqrt(k) * u * terms.abs_sum,
            LAMBDA**2 * math.sqrt(k) * u * terms.root_sum_sq,
        )
        return torch.where(rand, probabilistic, worst)

    return one(unit_roundoff(dtype)) + one(unit_roundoff(torch.float64))


def bound_description(dtype: torch.dtype) -> str:
    """One line naming the bound, for reports."""
    name = str(dtype).removeprefix("torch.")
    return (
        f"{name} rounding bound per element: min(l*sqrt(n+2)*u*S, l^2*sqrt(n+2)*u*R) on random "
        f"inputs, gamma(n+2)*S on ones/zeros (l={LAMBDA:g}, u={unit_roundoff(dtype):.3g}, "
        f"S=sum|w||x|+|b|, R=sqrt(sum(wx)^2+b^2)) + the float64 reference's own"
    )
