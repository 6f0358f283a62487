"""Observed float32 error of every form against verify's rounding-error bound, n = 9 .. 65,536.

For each dot-product length `n` a conv with a `(k, 1)` kernel over `C` channels (`n = C k`,
standard-normal weights and bias, so outputs grow like `sqrt(n)` as in trained networks) is
verified in float32 with the default tolerance. Printed per form: the largest absolute error
against the float64 reference, the largest ratio error / bound (<= 1 passes; the margin to 1 is
the bound's safety factor), and 'NO' where `torch.testing`'s fixed float32 defaults (rtol
1.3e-6, atol 1e-5, the old verify default) fail for sure (max abs error > atol + rtol max|y|).
The `torch` row is PyTorch's own float32 conv judged the same way.

A second table shows the bound still catches a real error: the largest kernel entry changed by
1e-3 relative, as err/bound of the changed conv (> 1 is caught).

Usage: python benchmarks/verify_bounds.py [--trials 8]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from convtool.compare import compare
from convtool.error_bounds import conv_bound_terms, elementwise_bound
from convtool.spec import ConvSpec
from convtool.verification import make_inputs, verify

CASES = [(1, 9), (16, 9), (64, 16), (256, 16), (512, 32), (1024, 64)]  # (C, k): n = C k


def _conv(c: int, k: int) -> nn.Conv2d:
    torch.manual_seed(c * 1000 + k)
    conv = nn.Conv2d(c, 4, (k, 1))
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    return conv


def _torch_row(conv: nn.Conv2d, shape: tuple[int, ...], trials: int, bump: bool) -> tuple:
    """(max abs err, err/bound, old default passes) of torch's own float32 conv."""
    spec = ConvSpec.from_module(conv)
    x = make_inputs(shape, trials, 0, torch.float32)
    weight = conv.weight.detach()
    terms = conv_bound_terms(spec, weight, conv.bias, x)
    random = torch.tensor([True] * trials + [False, False])
    bound = elementwise_bound(terms, torch.float32, random)
    w = weight.clone()
    if bump:
        w.view(-1)[int(w.abs().argmax())] *= 1 + 1e-3
    with torch.no_grad():
        y = F.conv2d(x, w, conv.bias).double()
    err = (y - terms.expected).abs()
    old = compare(terms.expected.float(), y.float()).passed
    return float(err.max()), float((err / bound).max()), old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    print("float32 error vs the bound (err/bound <= 1 passes); old = torch.testing's float32")
    print("defaults (rtol 1.3e-6, atol 1e-5), NO where they fail")
    print(f"{'n':>6} {'form':<16} {'max abs err':>12} {'err/bound':>10} {'old':>4}")
    worst: dict[str, float] = {}
    for c, k in CASES:
        conv, shape = _conv(c, k), (c, k + 1, 2)
        n = c * k
        report = verify(conv, shape, dtype="float32", trials=args.trials)
        for check in report.checks:
            cmp = check.comparison
            assert cmp is not None and cmp.bound_ratio is not None
            passes_old = cmp.max_abs_error <= 1e-5 + 1.3e-6 * _scale(conv, shape, args.trials)
            worst[check.form] = max(worst.get(check.form, 0.0), cmp.bound_ratio)
            print(f"{n:>6} {check.form:<16} {cmp.max_abs_error:>12.3e} {cmp.bound_ratio:>10.3e} "
                  f"{'yes' if passes_old else 'NO':>4}")  # fmt: skip
        err, ratio, old_ok = _torch_row(conv, shape, args.trials, bump=False)
        worst["torch"] = max(worst.get("torch", 0.0), ratio)
        print(f"{n:>6} {'torch conv2d':<16} {err:>12.3e} {ratio:>10.3e} "
              f"{'yes' if old_ok else 'NO':>4}")  # fmt: skip
    print("largest err/bound per form over all n: "
          + ", ".join(f"{f} {r:.3f}" for f, r in worst.items()))  # fmt: skip
    print()
    print("one kernel entry (the largest) changed by 1e-3 relative: err/bound (> 1 is caught)")
    for c, k in [(1, 9), (16, 9), (64, 9), (256, 9), (64, 64), (1024, 64)]:
        conv = _conv(c, k)
        _, ratio, _ = _torch_row(conv, (c, k + 1, 2), args.trials, bump=True)
        print(f"{c * k:>6} {'caught' if ratio > 1 else 'missed':>7} err/bound {ratio:.3g}")


def _scale(conv: nn.Conv2d, shape: tuple[int, ...], trials: int) -> float:
    """Largest |y| of the float64 reference (the rtol part of the old default, worst case)."""
    x = make_inputs(shape, trials, 0, torch.float64)
    with torch.no_grad():
        y = F.conv2d(x, conv.weight.double(), conv.bias.double())
    return float(y.abs().max()) if math.isfinite(float(y.abs().max())) else 0.0


if __name__ == "__main__":
    main()
