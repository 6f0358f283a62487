"""How fast is the Toeplitz build compared with what bounds it?

Prints, per case:
- dense build time / time to fill a tensor of the same size (torch.zeros): target <= 1.5x,
  the memory-bandwidth limit (every entry of T must be written at least once);
- autograd Jacobian time / dense build time: target >= 10x (the naive way to get T);
- sparse build time / time to fill index and value arrays of the same nnz: target <= 2x, for
  every conv kind (1-3 d, the four padding modes, transposed), COO and CSR, warm (template
  cached) and cold (every cache cleared first, as in each CLI run).

Run: python benchmarks/toeplitz.py [--repeat N] [--sparse-only]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from convtool import matrices, toeplitz
from convtool.matrices import matrix_shape, structural_nnz
from convtool.spec import ConvSpec


def best_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return min(times)


def jacobian(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.zeros(shape).flatten()
    return torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, *shape)).flatten(), x, vectorize=True
    )


def fmt_ratio(value: float, target: str, ok: bool) -> str:
    return f"{value:6.2f}x (target {target}: {'met' if ok else 'NOT met'})"


def dense_case(name: str, layer: nn.Module, shape: tuple[int, ...], repeat: int) -> None:
    spec = ConvSpec.from_module(layer)
    rows, cols = matrix_shape(spec, shape)
    toeplitz(layer, shape)  # warm the template cache: we time the matrix, not the index setup
    fill = best_time(lambda: torch.zeros((rows, cols)), repeat)
    build = best_time(lambda: toeplitz(layer, shape), repeat)
    clear_caches()
    cold = best_time(lambda: (toeplitz(layer, shape), clear_caches()), repeat)
    jac = best_time(lambda: jacobian(layer, shape), 1)
    print(f"{name}: T {rows} x {cols} ({rows * cols * 4 / 2**20:.0f} MiB float32)")
    print(
        f"  fill {fill * 1e3:8.1f} ms | build {build * 1e3:8.1f} ms (cold {cold * 1e3:.1f} ms)"
        f" | jacobian {jac * 1e3:9.1f} ms"
    )
    print(f"  dense build / fill      {fmt_ratio(build / fill, '<= 1.5x', build / fill <= 1.5)}")
    print(f"  dense build, cold cache {fmt_ratio(cold / fill, '<= 1.5x', cold / fill <= 1.5)}")
    print(f"  jacobian / dense build  {fmt_ratio(jac / build, '>= 10x', jac / build >= 10)}")


def clear_caches() -> None:
    """Forget every cached template (each ``lru_cache`` in convtool.matrices): a cold build."""
    for value in vars(matrices).values():
        if hasattr(value, "cache_clear"):
            value.cache_clear()


def sparse_case(name: str, layer: nn.Module, shape: tuple[int, ...], repeat: int) -> list[float]:
    """Sparse build / fill bound for COO and CSR, warm and cold; returns the four ratios."""
    spec = ConvSpec.from_module(layer)
    nnz = structural_nnz(spec, shape)

    def fill() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty((2, nnz), dtype=torch.int64).fill_(1), torch.empty(nnz).fill_(1.0)

    def build(layout: str, cold: bool) -> Callable[[], object]:
        def run() -> object:
            if cold:
                clear_caches()
            return toeplitz(layer, shape, sparse=True, layout=layout)

        return run

    toeplitz(layer, shape, sparse=True)
    fns = {"fill": fill}
    for layout in ("coo", "csr"):
        fns[f"{layout} warm"] = build(layout, cold=False)
        fns[f"{layout} cold"] = build(layout, cold=True)
    times = best_times(fns, repeat)
    ratios = [times[key] / times["fill"] for key in fns if key != "fill"]
    cells = "  ".join(f"{r:5.2f}x" for r in ratios)
    print(f"  {name:44s} nnz {nnz / 1e6:5.2f}M fill {times['fill'] * 1e3:6.1f} ms  {cells}")
    return ratios


def best_times(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Minimum time of each function; they take turns so load from others hits all alike."""
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            result = fn()
            times[key].append(time.perf_counter() - start)
            del result
    return {key: min(ts) for key, ts in times.items()}


SPARSE_MODES = ("zeros", "reflect", "replicate", "circular")


def sparse_cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    cases: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    for mode in SPARSE_MODES:
        cases += [
            (
                f"Conv1d 16->32 k5 p2 @ 4096 {mode}",
                nn.Conv1d(16, 32, 5, padding=2, padding_mode=mode),
                (16, 4096),
            ),
            (
                f"Conv2d 16->32 k3 p1 @ 32x32 {mode}",
                nn.Conv2d(16, 32, 3, padding=1, padding_mode=mode),
                (16, 32, 32),
            ),
            (
                f"Conv3d 8->16 k3 p1 @ 16^3 {mode}",
                nn.Conv3d(8, 16, 3, padding=1, padding_mode=mode),
                (8, 16, 16, 16),
            ),
        ]
    cases += [
        (
            "ConvT1d 32->16 k4 s2 p1 @ 2048",
            nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1),
            (32, 2048),
        ),
        (
            "ConvT2d 32->16 k4 s2 p1 @ 16x16",
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
            (32, 16, 16),
        ),
        ("ConvT2d 16->32 k3 s1 p1 @ 32x32", nn.ConvTranspose2d(16, 32, 3, padding=1), (16, 32, 32)),
        (
            "ConvT3d 16->8 k4 s2 p1 @ 8^3",
            nn.ConvTranspose3d(16, 8, 4, stride=2, padding=1),
            (16, 8, 8, 8),
        ),
        (
            "ConvT2d 16->8 k3 s2 p1 op1 g2 @ 48x48",
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, groups=2),
            (16, 48, 48),
        ),
    ]
    return cases


def sparse_section(repeat: int) -> None:
    print("== Sparse T build / fill bound (index and value arrays of the same nnz); target <= 2x")
    print(f"  {'case':44s} {'':23s}  coo warm  cold  csr warm  cold")
    worst = 0.0
    for name, layer, shape in sparse_cases():
        worst = max(worst, *sparse_case(name, layer, shape, repeat))
    print(f"  worst ratio {fmt_ratio(worst, '<= 2x', worst <= 2)}")


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # A fixed threshold turns off glibc's adaptive one, which lets a freed block be reused
        # without page faults by whichever call comes next: every large array (the bound's
        # and the build's alike) then comes fresh from the OS, as in a CLI run.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sparse-only", action="store_true", help="only the sparse section")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    with torch.no_grad():
        if not args.sparse_only:
            dense_case(
                "Conv2d 3->16 3x3 pad 1 @ 32x32",
                nn.Conv2d(3, 16, 3, padding=1),
                (3, 32, 32),
                args.repeat,
            )
            dense_case(
                "Conv2d 16->64 3x3 pad 1 @ 16x16",
                nn.Conv2d(16, 64, 3, padding=1),
                (16, 16, 16),
                args.repeat,
            )
            dense_case(
                "Conv2d 1->8 5x5 pad 2 @ 64x64",
                nn.Conv2d(1, 8, 5, padding=2),
                (1, 64, 64),
                args.repeat,
            )
        sparse_section(args.repeat)


if __name__ == "__main__":
    main()
