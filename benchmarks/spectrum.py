"""Seconds to sigma_max of 3x3 zero-padded conv layers (float64), against a dense SVD and 100
power iterations, and the accuracy of `convtool.spectrum`'s Lanczos path.

Run: `python benchmarks/spectrum.py` (all cases, ~minutes) or `--quick` (16 -> 16 at 32x32 and
the accuracy check). Timings depend on the machine and its load: compare the ratios printed by one
run. The dense SVD is timed only where T has at most 4096 columns (larger ones are estimated
from the cubic cost of the one measured, and marked '~').

Accuracy: the reference sigma_max is Lanczos run to `tol=1e-12` (its residual bound printed),
and the default `tol=1e-6` result's relative error against it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import convtool


def _timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def power_iterations(op: convtool.ConvOperator, steps: int = 100) -> float:
    x = np.random.default_rng(0).standard_normal(op.shape[1])
    for _ in range(steps):
        x = op.rmatvec(op.matvec(x))
        x /= np.linalg.norm(x)
    return float(np.linalg.norm(op.matvec(x)))


def dense_svd(layer: nn.Module, shape: tuple[int, ...]) -> float:
    t = convtool.toeplitz(layer, shape)
    return float(torch.linalg.svdvals(t)[0])


def run(channels: int, size: int, dense_ref: tuple[int, float] | None) -> tuple[int, float]:
    torch.manual_seed(0)
    layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False).double()
    shape = (channels, size, size)
    n = channels * size * size
    s, t_fast = _timed(lambda: convtool.spectrum(layer, shape, k=1, method="svds"))
    op = convtool.linear_operator(layer, shape)
    p, t_power = _timed(lambda: power_iterations(op))
    if n <= 4096:
        _, t_dense = _timed(lambda: dense_svd(layer, shape))
        dense, dense_ref = f"{t_dense:8.2f}", (n, t_dense)
    else:
        assert dense_ref is not None
        t_dense = dense_ref[1] * (n / dense_ref[0]) ** 3
        dense = f"~{t_dense:7.0f}"
    print(
        f"{channels:3d}->{channels:<3d} {size:3d}x{size:<3d} {n:8d} {t_fast:8.2f} "
        f"{s.matvecs:6d} {dense} {t_dense / t_fast:9.1f}x {t_power:8.2f} "
        f"{t_power / t_fast:6.2f}x   {s.values[0]:.9f} power100={p:.9f}"
    )
    return dense_ref or (n, t_dense)


def accuracy(channels: int, size: int) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False).double()
    shape = (channels, size, size)
    fast, t_fast = _timed(lambda: convtool.spectrum(layer, shape, k=1, method="svds"))
    ref, t_ref = _timed(lambda: convtool.spectrum(layer, shape, k=1, method="svds", tol=1e-12))
    err = abs(fast.values[0] - ref.values[0]) / ref.values[0]
    print(
        f"accuracy {channels}->{channels} at {size}x{size}: tol=1e-6 gives {fast.values[0]:.12f} "
        f"in {t_fast:.2f} s ({fast.matvecs} products); reference tol=1e-12 "
        f"{ref.values[0]:.12f} (residual bound {ref.tolerance:.1e}, {ref.matvecs} products, "
        f"{t_ref:.1f} s); relative error {err:.1e} (target 1e-6)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16->16 at 32x32 only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    print(
        "layer      input      cols  lanczos  prods    dense  dense/lz   power100  pow/lz   "
        "sigma_max"
    )
    cases = [(16, 32)] if args.quick else [(16, 32), (16, 64), (64, 32), (64, 64)]
    dense_ref = None
    # 16 -> 16 at 16x16 (4096 columns) calibrates the dense SVD's cubic cost
    dense_ref = run(16, 16, dense_ref)
    for channels, size in cases:
        dense_ref = run(channels, size, dense_ref)
    accuracy(16, 32 if args.quick else 64)
    if not args.quick:
        accuracy(64, 64)


if __name__ == "__main__":
    main()
