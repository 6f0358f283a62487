"""Comparing a candidate output with the oracle's, Polygraphy style.

:func:`compare` returns a :class:`Comparison` whose max errors are the tightest tolerances that
would have passed; the pass rule is `torch.isclose`'s (|actual - expected| <= atol + rtol *
|expected|), and any NaN/inf is a mismatch, never a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from convtool.errors import ConvtoolError

__all__ = [
    "DTYPES",
    "Comparison",
    "Tolerance",
    "compare",
    "default_tolerance",
    "parse_dtype",
    "resolve_tolerance",
]

# torch.testing.assert_close's defaults (rtol, atol) per dtype.
_DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """`|actual - expected| <= atol + rtol * |expected|` elementwise, as `torch.testing`.

    Attributes:
        rtol, atol: the tolerances.
        source: where they came from, e.g. 'torch.testing defaults for float64' or 'user'.
    """

    rtol: float
    atol: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"rtol": self.rtol, "atol": self.atol, "source": self.source}


def default_tolerance(*dtypes: torch.dtype) -> Tolerance:
    """`torch.testing.assert_close`'s defaults; with several dtypes, the loosest (as it does)."""
    pairs = [_DEFAULT_TOLERANCES.get(d, (0.0, 0.0)) for d in dtypes] or [(0.0, 0.0)]
    rtol, atol = max(p[0] for p in pairs), max(p[1] for p in pairs)
    names = "/".join(sorted({str(d).removeprefix("torch.") for d in dtypes}))
    return Tolerance(rtol, atol, f"torch.testing defaults for {names}")


def resolve_tolerance(
    dtype: torch.dtype, rtol: float | None, atol: float | None, source: str = "user"
) -> Tolerance:
    """The user's tolerances (both or neither, as `torch.testing`), else the dtype's defaults."""
    if rtol is None and atol is None:
        return default_tolerance(dtype)
    if rtol is None or atol is None:
        given = "rtol" if atol is None else "atol"
        missing = "atol" if atol is None else "rtol"
        raise ConvtoolError(
            f"`{given}` was given without `{missing}`; give both (e.g. rtol=1e-5, atol=1e-6) or "
            f"neither for the {str(dtype).removeprefix('torch.')} defaults",
            params=("rtol", "atol"),
        )
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not math.isfinite(value) or value < 0:
            raise ConvtoolError(f"{name} must be a finite non-negative number, got {value!r}")
    return Tolerance(float(rtol), float(atol), source)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'float32' / 'float64' / torch.float32 / torch.float64 -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif str(dtype).lower().removeprefix("torch.") in DTYPES:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    raise ConvtoolError(f"dtype must be float32 or float64, got {dtype!r}")


# ---------------------------------------------------------------------------------- compare
@dataclass(frozen=True)
class Comparison:
    """Elementwise errors of `actual` against `expected` (Polygraphy style).

    Errors are computed in float64. The relative error is `|actual - expected| / |expected|`
    (0 where both are 0, inf where only the expected value is 0).

    The max errors are the tightest tolerances that would have passed: `max_abs_error` is the
    smallest `atol` that passes with `rtol=0`, `max_rel_error` the smallest `rtol` that passes
    with `atol=0`, and `atol_needed` the smallest `atol` that passes with the `rtol` used.
    Any NaN or inf in either tensor is a mismatch (no tolerance passes it): the max errors are then
    inf and `nonfinite` counts the positions.

    Attributes:
        shape: shape of `expected`.
        numel: elements compared.
        max_abs_error, mean_abs_error, median_abs_error: of `|actual - expected|` (mean and median
            over the finite positions).
        max_rel_error: see above.
        rtol, atol, tolerance_source: the tolerance used and where it came from.
        mismatches: elements outside the tolerance (non-finite ones included).
        nonfinite: positions where either tensor holds NaN or inf.
        worst_index: index (into `shape`) of the largest error; None when nothing was compared.
        atol_needed: smallest atol that passes with `rtol`.
        passed: no mismatch and equal shapes.
        note: why a comparison failed before any arithmetic (shape mismatch), else ''.
    """

    shape: tuple[int, ...]
    numel: int
    max_abs_error: float
    mean_abs_error: float
    median_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    tolerance_source: str
    mismatches: int
    nonfinite: int
    worst_index: tuple[int, ...] | None
    atol_needed: float
    passed: bool
    note: str = ""

    def __bool__(self) -> bool:
        return self.passed

    @property
    def tightest_atol(self) -> float:
        """Smallest atol that passes at rtol=0 (== `max_abs_error`)."""
        return self.max_abs_error

    @property
    def tightest_rtol(self) -> float:
        """Smallest rtol that passes at atol=0 (== `max_rel_error`)."""
        return self.max_rel_error

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; inf/NaN become null (see `nonfinite` and `passed`)."""
        return {
            "max_abs_error": _num(self.max_abs_error),
            "mean_abs_error": _num(self.mean_abs_error),
            "median_abs_error": _num(self.median_abs_error),
            "max_rel_error": _num(self.max_rel_error),
            "rtol": self.rtol,
            "atol": self.atol,
            "tolerance_source": self.tolerance_source,
            "tightest_atol_at_rtol_0": _num(self.tightest_atol),
            "tightest_rtol_at_atol_0": _num(self.tightest_rtol),
            "atol_needed_at_rtol": _num(self.atol_needed),
            "mismatches": self.mismatches,
            "nonfinite": self.nonfinite,
            "numel": self.numel,
            "worst_index": list(self.worst_index) if self.worst_index is not None else None,
        }


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _as_tensor(value: Any, what: str) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():
        raise ConvtoolError(f"compare() handles real tensors; {what} is {t.dtype}")
    return t


def compare(
    expected: Any,
    actual: Any,
    rtol: float | None = None,
    atol: float | None = None,
    *,
    tolerance_source: str = "user",
) -> Comparison:
    """Compare a candidate with the oracle's output, elementwise.

    Args:
        expected: the oracle's output (tensor or array-like; sparse tensors are densified).
        actual: the candidate's output, same shape.
        rtol, atol: both or neither; neither -> `torch.testing.assert_close`'s defaults for the
            two dtypes (float32: 1.3e-6 / 1e-5, float64: 1e-7 / 1e-7).
        tolerance_source: recorded as the source of user-given tolerances.

    Returns:
        A :class:`Comparison`; `bool(result)` is `result.passed`.
    """
    e, a = _as_tensor(expected, "expected"), _as_tensor(actual, "actual")
    if rtol is None and atol is None:
        tol = default_tolerance(e.dtype, a.dtype)
    else:
        tol = resolve_tolerance(e.dtype, rtol, atol, tolerance_source)
    if e.shape != a.shape:
        inf = math.inf
        return Comparison(
            tuple(e.shape), e.numel(), inf, inf, inf, inf, tol.rtol, tol.atol, tol.source,
            max(e.numel(), a.numel()), 0, None, inf, False,
            note=f"shape mismatch: expected {tuple(e.shape)}, got {tuple(a.shape)}",
        )  # fmt: skip
    e64, a64 = e.to(torch.float64).reshape(-1), a.to(torch.float64).reshape(-1)
    finite = torch.isfinite(e64) & torch.isfinite(a64)
    nonfinite = int(finite.numel() - finite.sum())
    diff = torch.where(finite, (a64 - e64).abs(), 0.0)
    mag = torch.where(finite, e64.abs(), 0.0)
    rel = torch.where(diff == 0, 0.0, diff / mag)  # x/0 -> inf where only expected is 0
    mismatches = int((diff > tol.atol + tol.rtol * mag).sum()) + nonfinite  # as torch.isclose
    excess = diff - tol.rtol * mag
    finite_diff = diff[finite]
    if finite_diff.numel():
        mean_abs, median_abs = float(finite_diff.mean()), float(finite_diff.median())
    else:
        mean_abs = median_abs = math.nan
    if nonfinite:
        max_abs = max_rel = atol_needed = math.inf
        worst_flat = int(torch.nonzero(~finite)[0, 0])
    elif e64.numel() == 0:
        max_abs = max_rel = atol_needed = 0.0
        worst_flat = -1
    else:
        worst_flat = int(diff.argmax())
        max_abs, max_rel = float(diff[worst_flat]), float(rel.max())
        atol_needed = max(0.0, float(excess.max()))
    worst = None if worst_flat < 0 else _unravel(worst_flat, tuple(e.shape))
    return Comparison(
        shape=tuple(e.shape),
        numel=e.numel(),
        max_abs_error=max_abs,
        mean_abs_error=mean_abs,
        median_abs_error=median_abs,
        max_rel_error=max_rel,
        rtol=tol.rtol,
        atol=tol.atol,
        tolerance_source=tol.source,
        mismatches=mismatches,
        nonfinite=nonfinite,
        worst_index=worst,
        atol_needed=atol_needed,
        passed=mismatches == 0,
    )


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))
