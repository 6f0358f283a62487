"""How much does computing a conv only inside a region save?

For Conv2d 3->64 and 64->64 (3x3, padding 1) at 128x128 and 256x256, batch 1 and 8, and two
kinds of region (random blobs, one centred box) covering 1%, 5%, 10%, 25% and 50% of the output
positions, prints the forward time of `nn.Conv2d` on the full input divided by:

- `RegionConv` as shipped (gather + GEMM below its density threshold, full conv + mask above);
- the gather + GEMM path alone (`max_density=1`), whose ratio crossing 1 is the crossover
  density printed per case (the shipped threshold should sit below the smallest of them).

Targets: >= 4x at 10%, >= 15x at 1%, and never more than 1.3x slower (ratio >= 0.77) at 50%.
Forward only, under `torch.no_grad()`, best of `--repeat` calls. Single-threaded by default
(`--threads`): on a shared machine that keeps both sides' timings comparable.

Run: python benchmarks/region.py [--repeat 3] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from convtool import RegionConv

DENSITIES = (0.01, 0.05, 0.10, 0.25, 0.50)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def blobs(size: int, density: float, seed: int) -> torch.Tensor:
    """Random smooth blobs covering `density` of a `size x size` grid (threshold of blurred
    noise at its quantile)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, size, size, generator=g)
    for _ in range(2):
        noise = F.avg_pool2d(noise, 15, stride=1, padding=7, count_include_pad=False)
    flat = noise.flatten()
    count = max(1, round(density * flat.numel()))
    threshold = flat.topk(count).values[-1]
    return (noise[0, 0] >= threshold).contiguous()


def box(size: int, density: float) -> torch.Tensor:
    side = max(1, round((density * size * size) ** 0.5))
    lo = (size - side) // 2
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[lo : lo + side, lo : lo + side] = True
    return mask


def crossover(points: list[tuple[float, float]]) -> str:
    """Density where the gather path's speed-up falls to 1 (linear interpolation)."""
    for (d0, r0), (d1, r1) in zip(points, points[1:], strict=False):
        if r0 >= 1.0 > r1:
            return f"{d0 + (r0 - 1.0) * (d1 - d0) / (r0 - r1):.0%}"
    if points and points[-1][1] >= 1.0:
        return f"> {points[-1][0]:.0%}"
    return f"< {points[0][0]:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="128x128 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = (128,) if args.quick else (128, 256)
    print(f"threads={torch.get_num_threads()}  repeat={args.repeat}  (ratio = conv time / region)")
    header = f"{'layer':>9} {'HxW':>7} {'N':>2} {'region':>6} {'dens':>5} {'conv ms':>8}"
    print(header + f" {'region ms':>9} {'shipped':>8} {'gather':>7}")
    summary: dict[float, list[float]] = {d: [] for d in DENSITIES}
    started = time.perf_counter()
    for c_in in (3, 64):
        conv = nn.Conv2d(c_in, 64, 3, padding=1)
        shipped, gather = RegionConv(conv), RegionConv(conv, max_density=1.0)
        for size in sizes:
            for n in (1, 8):
                x = torch.randn(n, c_in, size, size)
                with torch.no_grad():
                    full = best_time(lambda: conv(x), args.repeat)
                    for kind in ("blobs", "box"):
                        points = []
                        for d in DENSITIES:
                            mask = blobs(size, d, seed=int(d * 1000)) if kind == "blobs" else box(
                                size, d
                            )
                            t_gather = best_time(lambda m=mask: gather(x, m), args.repeat)
                            t_ship = t_gather
                            if d > shipped.max_density:
                                t_ship = best_time(lambda m=mask: shipped(x, m), args.repeat)
                            points.append((d, full / t_gather))
                            summary[d].append(full / t_ship)
                            print(
                                f"{c_in:>3}->64 3x3 {size:>3}x{size:<3} {n:>2} {kind:>6} "
                                f"{d:>5.0%} {full * 1e3:>8.2f} {t_ship * 1e3:>9.2f} "
                                f"{full / t_ship:>7.2f}x {full / t_gather:>6.2f}x"
                            )
                        print(f"{'':>30} crossover density (gather path): {crossover(points)}")
    print("\nshipped RegionConv speed-up over nn.Conv2d, min / median / max over all cases:")
    for d, ratios in summary.items():
        r = torch.tensor(ratios)
        print(f"  {d:>4.0%}: {r.min():6.2f}x {r.median():6.2f}x {r.max():6.2f}x")
    print(f"(threshold max_density={shipped.max_density}; {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
