"""A `.pt2` saved at batch 1 gives ONNX with a dynamic batch where its graph allows one.

Oracle: the original eager model run by PyTorch, against onnxruntime on the written graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.safety_helpers import run

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, dilation=1)
        self.head = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class Baked(Plain):
    """Reshapes to a literal batch of 1: only that batch is right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).reshape(1, -1))


def batch_dim(path: Path) -> int | str:
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or dim.dim_value


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("form", [["--to", "fc", "--sparse"], ["--to", "lc"]])
@pytest.mark.parametrize("cls", [Plain, Baked])
def test_fixed_batch_pt2_to_onnx(cls: type[nn.Module], form: list[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = cls().eval()
    source, out = tmp_path / "net.pt2", tmp_path / "net.onnx"
    torch.export.save(torch.export.export(net, (torch.randn(1, 2, 6, 6),)), source)
    result = run("convert", source, "--input-shape", "1,2,6,6", *form, "-o", out)
    assert result.exit_code == 0, result.stderr
    onnx.checker.check_model(onnx.load(str(out)))
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(out, x), net(x).numpy(), rtol=1e-5, atol=1e-5)
    if cls is Baked:  # the literal batch is in the graph: it stays 1
        assert batch_dim(out) == 1
        return
    assert isinstance(batch_dim(out), str)
    x = torch.randn(3, 2, 6, 6)
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(out, x), net(x).numpy(), rtol=1e-5, atol=1e-5)
