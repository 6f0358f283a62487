"""`.pt2` sources name conv calls the way eager models do (convtool.inventory's naming).

The oracle is the eager model itself: its inventory (run by hooks on the real module tree) and
its output. The mirror must give the same names and compute the same function.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from convtool.inventory import capture
from convtool.models import trace_source
from convtool.programs import export_mirror
from convtool.source import SourceOptions, load_source

SHAPE = (1, 3, 8, 8)


class Inner(nn.Module):
    """Two functional calls with one stored weight, plus a non-conv parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.filters = nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64))
        self.scale = nn.Parameter(torch.full((1,), 0.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.filters, padding=1) * self.scale + F.conv2d(
            x, self.filters, padding=1, dilation=1
        )


class OnlyWeight(nn.Module):
    """Not a conv module, though its only parameter is named `weight`: its call is functional."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 4, 1, 1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1, dtype=torch.float64)
        self.body = nn.Sequential(Inner())
        self.head = OnlyWeight()
        self.w = nn.Parameter(torch.randn(2, 5, 1, 1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(self.head(self.body(self.stem(x))), self.w)


def _saved(tmp_path: Path, model: nn.Module) -> Path:
    path = tmp_path / "m.pt2"
    program = torch.export.export(model.eval(), (torch.zeros(SHAPE, dtype=torch.float64),))
    torch.export.save(program, path)
    return path


def test_pt2_names_functional_calls_like_the_eager_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Model().eval()
    eager = [layer.name for layer in capture(model, SHAPE).layers]
    assert "body.0.F.conv2d#1" in eager and "head.F.conv2d#0" in eager  # the documented naming
    source = load_source(_saved(tmp_path, model), SourceOptions())
    assert [layer.name for layer in source.layers] == [
        "stem",
        "body.0.F.conv2d#0",
        "body.0.F.conv2d#1",
        "head.F.conv2d#0",
        "F.conv_transpose2d#0",
    ]
    assert [layer.name for layer in trace_source(source, SHAPE).layers] == eager
    x = torch.randn(SHAPE, dtype=torch.float64)
    assert source.model is not None
    torch.testing.assert_close(source.model(x), model(x), rtol=1e-12, atol=1e-12)


def test_pt2_without_module_stack_falls_back_to_weight_names(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Model().eval()
    program = torch.export.export(model, (torch.zeros(SHAPE, dtype=torch.float64),))
    for node in program.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    mirror, layers, _ = export_mirror(program)
    assert [layer.name for layer in layers][:2] == ["stem", "body_0_filters_conv"]
    x = torch.randn(SHAPE, dtype=torch.float64)
    torch.testing.assert_close(mirror(x), model(x), rtol=1e-12, atol=1e-12)
