"""How fast is the Toeplitz build compared with what bounds it?

Prints, per case:
- dense build time / time to fill a tensor of the same size (torch.zeros): target <= 1.5x,
  the memory-bandwidth limit (every entry of T must be written at least once);
- autograd Jacobian time / dense build time: target >= 10x (the naive way to get T);
- sparse build time / time to fill index and value arrays of the same nnz: target <= 3x.

Run: python benchmarks/toeplitz.py [--repeat N]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import torch
from torch import nn

from convtool import toeplitz
from convtool.matrices import _template_cached, matrix_shape, structural_nnz
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
    _template_cached.cache_clear()
    cold = best_time(lambda: (toeplitz(layer, shape), _template_cached.cache_clear()), repeat)
    jac = best_time(lambda: jacobian(layer, shape), 1)
    print(f"{name}: T {rows} x {cols} ({rows * cols * 4 / 2**20:.0f} MiB float32)")
    print(
        f"  fill {fill * 1e3:8.1f} ms | build {build * 1e3:8.1f} ms (cold {cold * 1e3:.1f} ms)"
        f" | jacobian {jac * 1e3:9.1f} ms"
    )
    print(f"  dense build / fill      {fmt_ratio(build / fill, '<= 1.5x', build / fill <= 1.5)}")
    print(f"  dense build, cold cache {fmt_ratio(cold / fill, '<= 1.5x', cold / fill <= 1.5)}")
    print(f"  jacobian / dense build  {fmt_ratio(jac / build, '>= 10x', jac / build >= 10)}")


def sparse_case(name: str, layer: nn.Module, shape: tuple[int, ...], repeat: int) -> None:
    spec = ConvSpec.from_module(layer)
    rows, cols = matrix_shape(spec, shape)
    nnz = structural_nnz(spec, shape)

    def fill() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty((2, nnz), dtype=torch.int64).fill_(1), torch.empty(nnz).fill_(1.0)

    toeplitz(layer, shape, sparse=True)
    base = best_time(fill, repeat)
    print(
        f"{name}: T {rows} x {cols}, nnz {nnz:,} (dense would be {rows * cols * 4 / 2**30:.1f} GiB)"
    )
    for layout in ("coo", "csr"):
        build = best_time(
            lambda layout=layout: toeplitz(layer, shape, sparse=True, layout=layout), repeat
        )
        ratio = build / base
        print(
            f"  sparse {layout} build {build * 1e3:7.1f} ms / fill {base * 1e3:7.1f} ms "
            f"{fmt_ratio(ratio, '<= 3x', ratio <= 3)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    with torch.no_grad():
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
            "Conv2d 1->8 5x5 pad 2 @ 64x64", nn.Conv2d(1, 8, 5, padding=2), (1, 64, 64), args.repeat
        )
        sparse_case(
            "Conv2d 64->64 3x3 pad 1 @ 32x32 (sparse)",
            nn.Conv2d(64, 64, 3, padding=1),
            (64, 32, 32),
            args.repeat,
        )


if __name__ == "__main__":
    main()
