"""How much does computing a conv only inside a region save?

For Conv2d 3->64 and 64->64 (3x3, padding 1) at 128x128 and 256x256, batch 1 and 8, and two
kinds of region (random blobs, one centred box) covering 1%, 5%, 10%, 25% and 50% of the output
positions, prints the forward time of `nn.Conv2d` on the full input divided by the time of:

- `RegionConv(conv, method='gather')`: per-position gather + GEMM;
- `RegionConv(conv, method='tiles')`: active 8x8 tiles through the conv (SBNet-style);
- `RegionConv(conv)` as shipped ('auto': its cost model picks one of them or the full conv),
  timed itself (the cost model's own work included).

Per layer, size and batch a 'floor' line gives the speed-up of an empty region: making the dense
filled output and nothing else, which bounds every path (the conv writes the same output, so
where writing it is a large part of the conv, as for 3->64, no region can be much faster). An
output of 32 MiB or more is a fresh zero mapping whose pages the kernel fills only when the
region writes to them, so there the floor leaves out that cost; the line then also gives the
speed-up of making the output and writing into every page ("every page written"), which a
region reaching every channel plane pays (a 1% blob does: about 4.4 ms of its ~7 ms on an
(8, 64, 128, 128) output).

Per case it prints the crossover density where the best region path stops beating the conv.
Targets for the shipped module: >= 4x at 10%, >= 15x at 1%, never more than 1.3x slower
(ratio >= 0.77) at 50%. Forward only, under `torch.no_grad()`. Each region time is paired with
a conv time measured right next to it (best of `--repeat` pairs), so load from other processes
affects both sides alike. Single-threaded by default (`--threads`).

Run: python benchmarks/region.py [--repeat 3] [--threads 1] [--quick] [--c-in 3 64]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convtool import RegionConv

DENSITIES = (0.01, 0.05, 0.10, 0.25, 0.50)


def paired(
    base: Callable[[], object], fn: Callable[[], object], repeat: int
) -> tuple[float, float]:
    """Best-of-`repeat` times of `base` and `fn`, measured alternately."""
    fn()  # warm-up: allocator, kernels
    tb, tf = [], []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        base()
        tb.append(time.perf_counter() - start)
        start = time.perf_counter()
        fn()
        tf.append(time.perf_counter() - start)
    return min(tb), min(tf)


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
    for (d0, r0), (d1, r1) in itertools.pairwise(points):
        if r0 >= 1.0 > r1:
            return f"{d0 + (r0 - 1.0) * (d1 - d0) / (r0 - r1):.0%}"
    if points and points[-1][1] >= 1.0:
        return f"> {points[-1][0]:.0%}"
    return f"< {points[0][0]:.0%}"


def measure(
    conv: nn.Module,
    modules: dict[str, RegionConv],
    x: torch.Tensor,
    mask: torch.Tensor,
    repeat: int,
) -> tuple[dict[str, float], str, float]:
    """Speed-ups over `conv` of each module (keyed as in `modules`), the method the shipped
    ('auto') module picked, and the best conv time in ms."""
    ratios: dict[str, float] = {}
    conv_ms = []
    with torch.no_grad():
        for name, module in modules.items():
            t_conv, t = paired(lambda: conv(x), lambda mod=module: mod(x, mask), repeat)
            ratios[name] = t_conv / t
            conv_ms.append(t_conv * 1e3)
    return ratios, modules["auto"].last_method or "?", min(conv_ms)


def floor(conv: nn.Module, x: torch.Tensor, size: int, repeat: int) -> float:
    """Speed-up of an empty region: only the filled output is made. No path that returns the
    dense output can beat it (the conv writes the same output)."""
    empty = torch.zeros(size, size, dtype=torch.bool)
    module = RegionConv(conv)
    with torch.no_grad():
        t_conv, t = paired(lambda: conv(x), lambda: module(x, empty), repeat)
    return t_conv / t


def written_floor(conv: nn.Module, x: torch.Tensor, size: int, repeat: int) -> float | None:
    """For outputs of 32 MiB and more (a fresh zero mapping, faulted in where written): the
    speed-up of making that output and writing one value into each 4 KiB page, which any region
    that reaches every channel plane pays (huge pages: 2 MiB at a time). None for smaller
    outputs, which the empty-region floor already covers."""
    shape = (x.shape[0], conv.out_channels, size, size)
    if math.prod(shape) * x.element_size() < 32 << 20:
        return None

    def make() -> torch.Tensor:
        out = torch.from_numpy(np.zeros(shape, dtype=np.float32))
        out.view(-1)[:: 4096 // out.element_size()] = 1.0
        return out

    with torch.no_grad():
        t_conv, t = paired(lambda: conv(x), make, repeat)
    return t_conv / t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="128x128 only")
    parser.add_argument("--c-in", type=int, nargs="+", default=[3, 64], help="layers to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = (128,) if args.quick else (128, 256)
    print(f"threads={torch.get_num_threads()} repeat={args.repeat}; ratio = conv time / time")
    print(
        f"{'layer':>12} {'HxW':>7} {'N':>2} {'region':>6} {'dens':>4} {'conv ms':>8} "
        f"{'gather':>7} {'tiles':>7} {'shipped':>8} {'(picks)':>8}"
    )
    print(
        "  (the 'floor' line per layer and size: the speed-up of an empty region, i.e. of only\n"
        "   making the dense filled output, the most any region path can reach)"
    )
    summary: dict[float, list[float]] = {d: [] for d in DENSITIES}
    started = time.perf_counter()
    for c_in in args.c_in:
        conv = nn.Conv2d(c_in, 64, 3, padding=1)
        modules = {m: RegionConv(conv, method=m) for m in ("gather", "tiles", "auto")}
        for size in sizes:
            for n in (1, 8):
                x = torch.randn(n, c_in, size, size)
                written = written_floor(conv, x, size, args.repeat)
                print(
                    f"{c_in:>5}->64 3x3 {size:>3}x{size:<3} {n:>2}  floor: "
                    f"{floor(conv, x, size, args.repeat):.2f}x"
                    + ("" if written is None else f"; every page written: {written:.2f}x")
                )
                for kind in ("blobs", "box"):
                    points = []
                    for d in DENSITIES:
                        mask = blobs(size, d, int(d * 1000)) if kind == "blobs" else box(size, d)
                        ratios, picked, conv_ms = measure(conv, modules, x, mask, args.repeat)
                        best = max(ratios["gather"], ratios["tiles"])
                        points.append((d, best))
                        summary[d].append(ratios["auto"])
                        print(
                            f"{c_in:>5}->64 3x3 {size:>3}x{size:<3} {n:>2} {kind:>6} {d:>4.0%} "
                            f"{conv_ms:>8.2f} {ratios['gather']:>6.2f}x "
                            f"{ratios['tiles']:>6.2f}x {ratios['auto']:>7.2f}x {picked:>8}"
                        )
                    print(f"{'':>30} crossover density (best region path): {crossover(points)}")
    print("\nshipped RegionConv speed-up over nn.Conv2d, min / median / max over the cases:")
    for d, values in summary.items():
        r = torch.tensor(values)
        print(f"  {d:>4.0%}: {r.min():6.2f}x {r.median():6.2f}x {r.max():6.2f}x")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
