"""LC and FC layers: speed and peak memory against the usual LC code and against the conv.

Run: ``PYTHONPATH=. python benchmarks/layers.py [--threads 1] [--targets-only] [--breakdown]``
(about 1-2 minutes on 2 cores; ``--breakdown`` adds the LC step's time per op).

* The LC targets: forward at N=1 against the time to read the weights once (the smaller of
  `weight.sum()` and `dot(w, w)`, measured in the same run): <= 1.5x; forward+backward at N=64
  (16->32, 32x32, 3x3) against `nn.Conv2d`: <= 2x; the 3-D case against `nn.Conv3d`: <= 3x.

* LC forward+backward (input, weight and bias gradients) of ``convtool.LocallyConnected*d``
  against the common "unfold + broadcast-multiply + sum" LC implementation (``UnfoldBroadcast``
  below, which materialises an `N x C_out x C_in*K x P` product) and against `nn.Conv*d` on the
  same shapes (same FLOPs), at the target shape of the issue plus a 1-D, a 3-D and an N=1 case.
* FC forward: the dense matrix, CSR and COO sparse matrices, and the conv, on a few layers.

Times are the minimum over repeats (robust to other processes sharing the CPU). Peak memory is
measured per case in a fresh subprocess (see :func:`peak_memory`).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convtool.convert import to_fully_connected, to_locally_connected
from convtool.matrices import matrix_shape
from convtool.spec import ConvSpec

# name: (conv, input shape with batch)
LC_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "2d N=64 16->32 32x32 k3 (target)": (lambda: nn.Conv2d(16, 32, 3), (64, 16, 32, 32)),
    "1d N=64 16->32 L=512 k3": (lambda: nn.Conv1d(16, 32, 3), (64, 16, 512)),
    "3d N=8 8->16 16^3 k3": (lambda: nn.Conv3d(8, 16, 3), (8, 8, 16, 16, 16)),
    "2d N=1 16->32 32x32 k3": (lambda: nn.Conv2d(16, 32, 3), (1, 16, 32, 32)),
}
TARGET = "2d N=64 16->32 32x32 k3 (target)"

FC_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "Conv2d 3->8 k3 p1 on 16x16, N=32": (lambda: nn.Conv2d(3, 8, 3, padding=1), (32, 3, 16, 16)),
    "Conv2d 8->16 k3 on 24x24, N=32": (lambda: nn.Conv2d(8, 16, 3), (32, 8, 24, 24)),
    "Conv1d 16->32 k5 p2 on 256, N=32": (lambda: nn.Conv1d(16, 32, 5, padding=2), (32, 16, 256)),
    "ConvT2d 16->8 k4 s2 p1 on 16x16, N=32": (
        lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
        (32, 16, 16, 16),
    ),
    "Conv2d 16->32 k3 p1 on 64x64, N=8": (lambda: nn.Conv2d(16, 32, 3, padding=1), (8, 16, 64, 64)),
}
DENSE_LIMIT = 2**29  # bytes; bigger dense matrices are skipped here


class UnfoldBroadcast(nn.Module):
    """The usual LC code: im2col, then `(N, 1, C_in*K, P) * (1, C_out, C_in*K, P)`, summed.

    No padding or groups (not needed for the benchmark cases). `F.unfold` is 2-d only, so 1-d
    inputs get a unit height and 3-d inputs are unfolded with chained `Tensor.unfold`.
    """

    def __init__(self, conv: nn.Module, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        c: Any = conv
        self.kernel = tuple(c.kernel_size)
        spatial = in_shape[2:]
        self.out_spatial = tuple(n - k + 1 for n, k in zip(spatial, self.kernel, strict=True))
        positions = math.prod(self.out_spatial)
        w = c.weight.detach().reshape(c.out_channels, -1, 1).expand(-1, -1, positions)
        self.weight = nn.Parameter(w.unsqueeze(0).contiguous())  # (1, C_out, C_in*K, P)
        self.bias = nn.Parameter(c.bias.detach()[None, :, None].expand(1, -1, positions).clone())

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if len(self.kernel) == 1:
            cols = F.unfold(x.unsqueeze(2), (1, self.kernel[0]))
        elif len(self.kernel) == 2:
            cols = F.unfold(x, self.kernel)
        else:
            w = x.unfold(2, self.kernel[0], 1).unfold(3, self.kernel[1], 1)
            w = w.unfold(4, self.kernel[2], 1)  # (N, C, oD, oH, oW, kd, kh, kw)
            cols = w.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(n, -1, math.prod(self.out_spatial))
        y = (cols.unsqueeze(1) * self.weight).sum(2) + self.bias
        return y.view(n, -1, *self.out_spatial)


def build(case: str, impl: str) -> tuple[nn.Module, Tensor, Tensor]:
    """(module, input requiring grad, output gradient) for one LC case and implementation."""
    make, shape = LC_CASES[case]
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(shape, requires_grad=True)
    with torch.no_grad():
        g = torch.randn_like(conv(x))
    module: nn.Module
    if impl == "lc":
        module = to_locally_connected(conv, shape)
    elif impl == "unfold-broadcast":
        module = UnfoldBroadcast(conv, shape)
    else:
        module = conv
    return module, x, g


def step(module: nn.Module, x: Tensor, g: Tensor) -> None:
    module(x).backward(g)
    module.zero_grad(set_to_none=True)
    x.grad = None


def best_times(
    fns: dict[str, Callable[[], None]], budget: float = 3.0, reps: int = 15
) -> dict[str, float]:
    """Minimum seconds per function over up to `reps` rounds (after a warm-up) within `budget`.

    The functions take turns, so a burst of load from other processes hits all of them.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for round_ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if round_ >= 1 and time.perf_counter() - start > budget:
            break
    return {name: min(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(case: str, impl: str) -> None:
    """In a fresh process: extra resident memory at the peak of one forward+backward step.

    Torch's CPU allocator is plain malloc, so the process RSS is the honest measure (tracemalloc
    does not see it). The parent sets MALLOC_MMAP_THRESHOLD_ so every large block is mmapped and
    returned to the OS on free: RSS then follows live memory. After a warm-up step (lazy library
    initialisation), the kernel's high-water mark is reset (`/proc/self/clear_refs` <- 5, Linux),
    one step runs, and we print `VmHWM - VmRSS before`: the memory the step needed beyond the
    already-allocated module and input (activations, temporaries, the new gradients).
    """
    module, x, g = build(case, impl)
    step(module, x, g)
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(module, x, g)
    print((_status_kib("VmHWM") - before) * 1024)


def peak_memory(case: str, impl: str) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": path}
    threads = str(torch.get_num_threads())
    cmd = [sys.executable, __file__, "--peak-memory", case, impl, "--threads", threads]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def check_equal(case: str) -> None:
    """Sanity: both LC implementations reproduce the conv (tied weights) on this case."""
    outs = {}
    for impl in ("conv", "lc", "unfold-broadcast"):
        module, x, _ = build(case, impl)
        with torch.no_grad():
            outs[impl] = module(x)
    for impl in ("lc", "unfold-broadcast"):
        torch.testing.assert_close(outs[impl], outs["conv"], rtol=1e-4, atol=1e-4)


def lc_section() -> None:
    print("== Locally connected: forward+backward, min time; peak extra memory of one step")
    impls = ("lc", "unfold-broadcast", "conv")
    for case in LC_CASES:
        check_equal(case)
        fast = {impl: partial(step, *build(case, impl)) for impl in ("lc", "conv")}
        t = best_times(fast)
        t.update(best_times({"unfold-broadcast": partial(step, *build(case, "unfold-broadcast"))}))
        m = {impl: peak_memory(case, impl) for impl in impls}
        print(f"-- {case}")
        for impl in impls:
            print(f"   {impl:17s} {t[impl] * 1e3:9.2f} ms  {mib(m[impl])}")
        speedup = t["unfold-broadcast"] / t["lc"]
        mem = m["lc"] / m["unfold-broadcast"]
        vs_conv = t["lc"] / t["conv"]
        line = (
            f"   lc is {speedup:.1f}x faster than unfold-broadcast, uses {mem:.3f}x its peak "
            f"memory, and takes {vs_conv:.2f}x the conv's time"
        )
        print(line)
        if case == TARGET:
            for ok, what in (
                (speedup >= 4, ">= 4x faster than unfold-broadcast"),
                (mem <= 1 / 3, "<= 1/3 of its peak memory"),
                (vs_conv <= 3, "within 3x of nn.Conv2d"),
            ):
                print(f"   target {what}: {'met' if ok else 'NOT met'}")


def targets_section() -> None:
    """The LC speed targets, each a ratio of times taken in turns within this run."""
    print("== LC targets (min times, taken in turns)")
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    lc = to_locally_connected(conv, (16, 32, 32))
    x = torch.randn(1, 16, 32, 32)
    weight = lc.weight.detach()
    flat = weight.view(-1)
    with torch.no_grad():
        t = best_times(
            {
                "lc": partial(lc, x),
                "weight.sum()": weight.sum,
                "dot(w, w)": partial(torch.dot, flat, flat),
            },
            reps=40,
        )
    bound = min(t["weight.sum()"], t["dot(w, w)"])
    ratio = t["lc"] / bound
    print(
        f"-- LC forward N=1 (16->32 3x3 on 32x32, weights {mib(weight.numel() * 4).strip()}): "
        f"{t['lc'] * 1e3:.3f} ms; reading the weights once {bound * 1e3:.3f} ms "
        f"(weight.sum {t['weight.sum()'] * 1e3:.3f}, dot {t['dot(w, w)'] * 1e3:.3f})"
    )
    print(f"   LC fwd N=1 / weight read: {ratio:.2f}x (target <= 1.5x: {_met(ratio <= 1.5)})")
    for case, target in ((TARGET, 2.0), ("3d N=8 8->16 16^3 k3", 3.0)):
        steps = {impl: partial(step, *build(case, impl)) for impl in ("lc", "conv")}
        t = best_times(steps, budget=6.0, reps=15)
        ratio = t["lc"] / t["conv"]
        print(
            f"-- {case}: fwd+bwd lc {t['lc'] * 1e3:.1f} ms, conv {t['conv'] * 1e3:.1f} ms: "
            f"{ratio:.2f}x (target <= {target:g}x: {_met(ratio <= target)})"
        )


def breakdown_section(steps: int = 3, top: int = 9) -> None:
    """Where an LC training step spends its time: self time per op and step (torch.profiler).

    numpy's products (the weight gradient, small-batch products) run inside the autograd
    Function and show up as its own time.
    """
    print("== LC step breakdown (self time per step, torch.profiler; numpy inside the Function)")
    for case in (TARGET, "3d N=8 8->16 16^3 k3"):
        module, x, g = build(case, "lc")
        step(module, x, g)
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                step(module, x, g)
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in rows) / steps / 1e3
        cells = ", ".join(f"{e.key} {e.self_cpu_time_total / steps / 1e3:.1f}" for e in rows[:top])
        print(f"-- {case}: {total:.1f} ms (profiled): {cells}")


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def fc_section() -> None:
    print("== Fully connected forward, min time (dense T skipped above 512 MiB)")
    for case, (make, shape) in FC_CASES.items():
        torch.manual_seed(0)
        conv = make()
        x = torch.randn(shape)
        sample = shape[1:]
        rows, cols = matrix_shape(ConvSpec.from_module(conv), sample)
        fns = {"conv": partial(no_grad, conv, x)}
        forms: list[tuple[str, dict[str, Any]]] = [
            ("csr", {"sparse": True, "layout": "csr"}),
            ("coo", {"sparse": True, "layout": "coo"}),
        ]
        if rows * cols * 4 <= DENSE_LIMIT:
            forms.insert(0, ("dense", {}))
        for name, kwargs in forms:
            fc = to_fully_connected(conv, sample, **kwargs)
            with torch.no_grad():
                torch.testing.assert_close(fc(x), conv(x), rtol=1e-4, atol=1e-4)
            fns[name] = partial(no_grad, fc, x)
        times = best_times(fns, budget=2.0, reps=10)
        cells = "  ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in times.items())
        print(f"-- {case}: T {rows} x {cols}\n   {cells}")


def no_grad(module: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        module(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-memory", nargs=2, metavar=("CASE", "IMPL"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--targets-only", action="store_true", help="only the LC target ratios")
    parser.add_argument(
        "--breakdown", action="store_true", help="also print where an LC step spends its time"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory:
        peak_memory_child(*args.peak_memory)
        return
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load:.2f} at start"
    )
    if torch.get_num_threads() > 1 and load > 0.5:
        print(
            "   other processes are using the CPU: multi-threaded timings are then dominated by "
            "waits for descheduled threads (try --threads 1)"
        )
    start = time.perf_counter()
    targets_section()
    if args.breakdown:
        breakdown_section()
    if not args.targets_only:
        lc_section()
        fc_section()
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
