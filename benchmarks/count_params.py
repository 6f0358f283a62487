"""Time and peak memory of `convtool.count_params` on a 224x224 network with 25 convs.

The network is a ResNet stem (7x7 stride-2 conv 3->64 + 3x3 stride-2 max-pool) followed by 24
64-channel 3x3 padding-1 convs at 56x56. Its dense FC form has hundreds of billions of entries;
counting it must not build anything: shapes come from one forward pass on a zero input of batch
1 (cheap: the model is small), and every count is analytic.

Usage:
    python benchmarks/count_params.py            # real weights, one traced forward
    python benchmarks/count_params.py --meta     # weights on the meta device: no data at all
    python benchmarks/count_params.py --json     # the totals as JSON on stdout
    python benchmarks/count_params.py --cli      # `convtool count-params` on its state_dict,
                                                 # in a subprocess (whole CLI, rich table)

Prints the wall time of `count_params` and the process's peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from convtool.params import count_params


def resnet_stem_net(blocks: int = 24, device: str | torch.device = "cpu") -> nn.Sequential:
    """7x7/2 conv 3->64, BN, ReLU, 3x3/2 max-pool, then `blocks` x (3x3 conv 64->64, BN, ReLU)."""
    with torch.device(device):
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        for _ in range(blocks):
            layers += [nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        return nn.Sequential(*layers)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_cli() -> int:
    """Save the net's state_dict and time `convtool count-params` on it in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "stem.pt"
        torch.save(resnet_stem_net().state_dict(), weights)
        command = [
            sys.executable,
            "-m",
            "convtool",
            "count-params",
            str(weights),
            "--model",
            f"{Path(__file__).resolve()}:resnet_stem_net",
            "--input-shape",
            "1,3,224,224",
        ]
        started = time.perf_counter()
        done = subprocess.run(command, check=False)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    print(
        f"convtool count-params (whole process, torch import included): {seconds:.2f} s; "
        f"peak RSS {peak / 1024**2:.0f} MiB; exit {done.returncode}"
    )
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta", action="store_true", help="build the model on the meta device")
    parser.add_argument("--json", action="store_true", help="print the totals as JSON")
    parser.add_argument("--cli", action="store_true", help="time the CLI in a subprocess")
    args = parser.parse_args(argv)
    if args.cli:
        return run_cli()

    torch.set_num_threads(1)  # shared machines: one core is plenty for one small forward
    model = resnet_stem_net(device="meta" if args.meta else "cpu")
    started = time.perf_counter()
    report = count_params(model, (1, 3, 224, 224))
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()

    total = report.total
    convs = len(report.layers)
    biggest = max(layer.fc_params or 0 for layer in report.layers)
    result = {
        "device": "meta" if args.meta else "cpu",
        "conv_layers": convs,
        "seconds": round(seconds, 3),
        "peak_rss_bytes": peak,
        "largest_layer_fc_params": biggest,
        **total.to_dict(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{convs} conv layers, input (1, 3, 224, 224), weights on {result['device']}")
        print(f"count_params: {seconds:.3f} s; peak RSS {peak / 1024**2:.0f} MiB")
        for key in ("original_params", "lc_params", "fc_params", "fc_nonzero"):
            print(f"  {key:16s} {total.to_dict()[key]:>16,}")
        print(f"  {'largest layer FC':16s} {biggest:>16,}")
        for key in ("conv_macs", "fc_dense_macs", "fc_sparse_macs"):
            print(f"  {key:16s} {total.to_dict()[key]:>16,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
