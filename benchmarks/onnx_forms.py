"""ONNX forms: file size and onnxruntime latency of each form against the plain conv model.

Run: ``PYTHONPATH=. python benchmarks/onnx_forms.py`` (about a minute on 2 cores; needs onnx,
onnxscript and onnxruntime).

For the digits sample (``samples/digits_cnn.pt``, 16x16 input, max pooling) and a larger CNN
(32x32x3, average pooling, so it also folds), the model is exported plainly to ONNX (Conv
nodes) and then written in every form convtool writes: LC, dense FC, sparse FC (ELL and
ScatterND) and, where the model folds, the folded dense and sparse networks. Each is timed in
onnxruntime (one thread, minimum over repeats: robust to other processes on the CPU) at batch 1
and batch 64, and printed as a ratio to the plain model.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from convtool.errors import ConvtoolError
from convtool.export import fold_onnx, folded_to_onnx, rewrite_onnx_convs
from convtool.export.torch_onnx import export_onnx


class LargerCNN(nn.Module):
    """3x32x32 -> 10: three conv-BN-avgpool-ReLU blocks (one grouped, one dilated), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.AvgPool2d(2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, groups=4),
            nn.BatchNorm2d(32),
            nn.AvgPool2d(2),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2),
            nn.AvgPool2d(2),
            nn.ReLU(),
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    from samples.digits_model import make_model

    digits = make_model()
    digits.load_state_dict(torch.load("samples/digits_cnn.pt", weights_only=True))
    torch.manual_seed(0)
    return {
        "digits (1x16x16)": (digits.eval(), (1, 1, 16, 16)),
        "larger CNN (3x32x32)": (LargerCNN().eval(), (1, 3, 32, 32)),
    }


def latency(model: Any, x: np.ndarray, budget: float) -> float:
    """Minimum seconds per run over repeats within `budget` seconds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    best, deadline = float("inf"), time.perf_counter() + budget
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return best


def forms(plain: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"plain conv (torch.onnx.export)": plain}
    out["lc"] = rewrite_onnx_convs(plain, "lc")[0]
    out["fc dense"] = rewrite_onnx_convs(plain, "fc")[0]
    out["fc sparse (ELL)"] = rewrite_onnx_convs(plain, "fc", True, sparse_form="ell")[0]
    out["fc sparse (ScatterND)"] = rewrite_onnx_convs(plain, "fc", True, sparse_form="scatter")[0]
    try:
        out["folded dense"] = folded_to_onnx(fold_onnx(plain))
        out["folded sparse"] = folded_to_onnx(fold_onnx(plain, sparse=True))
    except ConvtoolError as exc:
        out["folded"] = str(exc).split(";")[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timing per case")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; onnxruntime, 1 thread; shared machine: compare ratios")
    for name, (model, shape) in models().items():
        plain = export_onnx(model, shape)
        table = forms(plain)
        base_size = plain.ByteSize()
        rng = np.random.default_rng(0)
        xs = {n: rng.standard_normal((n, *shape[1:])).astype(np.float32) for n in (1, 64)}
        base = {n: latency(plain, x, args.budget) for n, x in xs.items()}
        expected = {n: ort_out(plain, x) for n, x in xs.items()}
        print(
            f"\n{name}: plain ONNX {base_size / 1024:.1f} KiB, "
            f"{base[1] * 1e6:.0f} us at N=1, {base[64] * 1e3:.2f} ms at N=64"
        )
        print(f"{'form':32} {'size':>9} {'x size':>8} {'N=1 x':>8} {'N=64 x':>8} {'max err':>9}")
        for form, model_ in table.items():
            if isinstance(model_, str):
                print(f"{form:32} refused: {model_}")
                continue
            size = model_.ByteSize()
            t = {n: latency(model_, x, args.budget) for n, x in xs.items()}
            err = max(float(np.abs(ort_out(model_, x) - expected[n]).max()) for n, x in xs.items())
            print(
                f"{form:32} {size / 1024:7.1f}Ki {size / base_size:8.2f} "
                f"{t[1] / base[1]:8.2f} {t[64] / base[64]:8.2f} {err:9.1e}"
            )


def ort_out(model: Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


if __name__ == "__main__":
    main()
