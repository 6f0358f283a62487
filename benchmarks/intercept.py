"""What the conv-call interception costs a converted model's forward.

A converted model (:class:`convtool.models.ConvertedModel`) runs the original forward with every
conv call intercepted (a TorchFunctionMode plus module hooks) and computed by its form. This
prints, for a small CNN (8 convs) at batch 1 and 32:

- `plain`: the original model;
- `intercept`: the original model with every call intercepted and run unchanged (the pure
  overhead of interception);
- the ratio intercept / plain, measured in the same run (the machine may be shared: ratios, not
  absolute times, are what to compare).

Usage:
    python benchmarks/intercept.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from convtool.inventory import intercept


def make_model() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    for _ in range(7):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = make_model()
    for batch in (1, 32):
        x = torch.randn(batch, 3, 32, 32)

        def plain(x: torch.Tensor = x) -> object:
            with torch.no_grad():
                return model(x)

        def intercepted(x: torch.Tensor = x) -> object:
            with torch.no_grad(), intercept(model, lambda call, run: run()):
                return model(x)

        plain()
        intercepted()
        t_plain, t_int = best(plain, args.repeats), best(intercepted, args.repeats)
        print(
            f"batch {batch:>2}: plain {t_plain * 1e3:7.3f} ms, intercept {t_int * 1e3:7.3f} ms, "
            f"ratio {t_int / t_plain:5.2f}"
        )


if __name__ == "__main__":
    main()
