"""Wall time and peak memory of whole-model commands on a ResNet-18-shaped network.

Writes the random weights of :func:`benchmarks.resnet18.make_resnet18` as a state_dict, then runs
each command in its own child process (`python -m convtool ...` with `--model
benchmarks.resnet18:make_resnet18`) and reads the child's peak RSS from `os.wait4`:

    count-params, inspect, verify --to lc, verify --to fc, convert --to lc (.safetensors),
    convert --to fc --sparse (.pt)

For each verify it also prints `ref = interpreter + 1.5 x the largest single form the run
compared (from its --json report) + the model (the one loaded, float32, and verify's copy in
its dtype: 3x the float32 size in float64)` and `ratio = peak / ref`; for each convert
`ref = interpreter + 1.3 x the converted model (the file written)`. ratio <= 1 meets issue
15's targets ("about 1.5x the largest form plus the model", "at most 1.3x the converted
model"). The interpreter is the peak RSS of
`python -m convtool --version` (python + torch).

Usage:
    python benchmarks/whole_model.py                      # 64x64
    python benchmarks/whole_model.py --sizes 64,224 --max-memory 6G
    python benchmarks/whole_model.py --only verify-fc --sizes 64
    python benchmarks/whole_model.py --convtool /tmp/old  # time another checkout ("before")
    python benchmarks/whole_model.py --only verify-all --sizes 224 --max-memory 9G

`--max-memory` is passed to verify and convert; `--limit-as` (default: 2x max-memory + 3 GiB)
caps each child's address space, so a shared machine is safe whatever the code does. The
timings are noisy on a shared machine; compare ratios taken in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.resnet18`, as the children import it
MODEL = "benchmarks.resnet18:make_resnet18"
COMMANDS = ("count-params", "inspect", "verify-lc", "verify-fc", "convert-lc", "convert-fc-sparse")


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def _args(name: str, weights: Path, size: int, out: Path, max_memory: str | None) -> list[str]:
    common = [str(weights), "--model", MODEL, "--input-shape", f"1,3,{size},{size}"]
    limit = ["--max-memory", max_memory] if max_memory else []
    return {
        "count-params": ["count-params", *common],
        "inspect": ["inspect", *common],
        "verify-lc": ["verify", *common, "--to", "lc", "--json", *limit],
        "verify-fc": ["verify", *common, "--to", "fc", "--json", *limit],
        "verify-all": ["verify", *common, "--to", "all", "--json", *limit],
        "convert-lc": ["convert", *common, "--to", "lc", "-o", str(out / "lc.safetensors"),
                       "--force", *limit],
        "convert-fc-sparse": ["convert", *common, "--to", "fc", "--sparse", "-o",
                              str(out / "fc_sparse.pt"), "--force", *limit],
    }[name]  # fmt: skip


def run_child(
    argv: list[str], env: dict[str, str], limit_as: int | None, cwd: str
) -> dict[str, Any]:
    """Run `python -m convtool ARGV` in `cwd` (whose convtool `-m` finds first); wall seconds,
    peak RSS bytes, exit code, stdout and stderr."""

    def limit() -> None:
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "convtool", *argv], stdout=out, stderr=err, env=env,
            cwd=cwd, preexec_fn=limit,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {
        "seconds": wall,
        "peak": usage.ru_maxrss * 1024,
        "rc": proc.returncode,
        "stdout": stdout,
        "stderr": stderr,
    }


def _largest_form(report: dict[str, Any]) -> int:
    """Bytes of the largest per-layer form a verify --json report compared."""
    from convtool.matrices import matrix_info
    from convtool.spec import ConvSpec

    model = _model()
    itemsize = 8 if report.get("dtype") == "float64" else 4
    largest = 0
    for entry in report["layers"]:
        if entry["status"] not in ("passed", "failed"):
            continue
        spec = ConvSpec.from_module(model.get_submodule(entry["name"]))
        shape = tuple(entry["input_shape"])
        info = matrix_info(spec, shape, torch.float64 if itemsize == 8 else torch.float32)
        if entry["form"] == "fc_dense":
            size = info.dense_bytes
        elif entry["form"] == "lc":
            out = spec.output_shape(shape)
            size = math.prod(out) * spec.in_channels // spec.groups * spec.kernel_numel * itemsize
        else:
            size = info.csr_bytes
        largest = max(largest, size)
    return largest


_MODEL: Any = None


def _model() -> Any:
    global _MODEL
    if _MODEL is None:
        from benchmarks.resnet18 import make_resnet18

        _MODEL = make_resnet18()
    return _MODEL


def _gib(n: float) -> str:
    return f"{n / 2**30:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64", help="comma-separated input sizes, e.g. 64,224")
    parser.add_argument("--only", default=",".join(COMMANDS), help="comma-separated commands")
    parser.add_argument("--max-memory", default=None, help="passed to verify/convert, e.g. 6G")
    parser.add_argument("--limit-as", default=None, help="address-space cap of each child")
    parser.add_argument("--convtool", default=str(ROOT), help="checkout whose convtool to run")
    args = parser.parse_args()
    limit_as = _parse_size(args.limit_as) if args.limit_as else None
    if limit_as is None and args.max_memory:
        limit_as = 2 * _parse_size(args.max_memory) + 3 * 2**30
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.convtool, str(ROOT)]),
           "COLUMNS": "120"}  # fmt: skip
    model_bytes = sum(t.numel() * t.element_size() for t in _model().state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = folder / "resnet18.pt"
        torch.save(_model().state_dict(), weights)
        base = run_child(["--version"], env, limit_as, args.convtool)["peak"]
        print(f"convtool from {args.convtool}; model {model_bytes / 2**20:.1f} MiB (float32); "
              f"interpreter + torch baseline {_gib(base)} GiB; max-memory {args.max_memory}; "
              f"address-space cap {_gib(limit_as) if limit_as else 'none'} GiB")  # fmt: skip
        print(f"{'command':<18} {'size':>5} {'rc':>3} {'wall s':>8} {'peak GiB':>9} "
              f"{'ref GiB':>8} {'ratio':>6}  summary")  # fmt: skip
        for size in (int(s) for s in args.sizes.split(",")):
            for name in args.only.split(","):
                argv = _args(name, weights, size, folder, args.max_memory)
                res = run_child(argv, env, limit_as, args.convtool)
                ref, summary = None, ""
                lines = (res["stdout"] + res["stderr"]).strip().splitlines()
                summary = lines[-1][:150] if lines else ""
                if name.startswith("verify") and res["rc"] in (0, 1):
                    report = json.loads(res["stdout"])
                    wide = 3 if report.get("dtype") == "float64" else 2
                    ref = base + 1.5 * _largest_form(report) + wide * model_bytes
                    s = report["summary"]
                    summary = (f"passed {s['passed']}, failed {s['failed']}, skipped "
                               f"{s['skipped']}, partial {s.get('partial', '-')}, n/a "
                               f"{s['not applicable']}")  # fmt: skip
                if name.startswith("convert") and res["rc"] == 0:
                    written = next(folder.glob("lc.*" if name == "convert-lc" else "fc_*"))
                    ref = base + 1.3 * written.stat().st_size
                    written.unlink()
                ratio = f"{res['peak'] / ref:6.2f}" if ref else "     -"
                ref_text = _gib(ref) if ref else "       -"
                print(f"{name:<18} {size:>5} {res['rc']:>3} {res['seconds']:>8.1f} "
                      f"{_gib(res['peak']):>9} {ref_text:>8} {ratio}  {summary}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
