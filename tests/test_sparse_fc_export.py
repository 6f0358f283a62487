"""The sparse FullyConnected form goes through torch.export and torch.onnx.export as it is.

Oracles: the original conv model (eager PyTorch, `F.conv*` inside `nn.Conv*`) and onnxruntime
running the exported graph; the `.pt2` is loaded by torch alone, in an interpreter that cannot
import convtool.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import convtool
from convtool.convert import to_fully_connected
from convtool.layers import FullyConnected

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DYNAMIC = torch.export.Dim.DYNAMIC


def make_net() -> nn.Module:
    """Dilation, groups, reflect padding, stride, ReLU and a Linear head."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=2, dilation=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()


def close(actual: np.ndarray | torch.Tensor, expected: torch.Tensor) -> None:
    """float32 rounding level at the output's scale."""
    got = actual.detach() if isinstance(actual, torch.Tensor) else torch.as_tensor(actual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def ort_run(model_proto: object, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(model_proto.SerializeToString())  # type: ignore[attr-defined]
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def converted() -> tuple[nn.Module, nn.Module]:
    net = make_net()
    model = convtool.convert_model(net, torch.randn(1, 2, 8, 8), to="fc", sparse=True).eval()
    layers = [m for m in model.modules() if isinstance(m, FullyConnected)]
    assert len(layers) == 2 and all(m.layout == "csr" for m in layers)
    return net, model


ISOLATED = textwrap.dedent(
    """
    import sys
    sys.modules["convtool"] = None  # importing convtool must fail here
    import torch
    program = torch.export.load(sys.argv[1])
    data = torch.load(sys.argv[2])
    for x, expected in zip(data["xs"], data["expected"]):
        got = program.module()(x)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    print("ok")
    """
)


def test_torch_export_dynamic_batch_and_pt2_without_convtool(
    converted: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    net, model = converted
    program = torch.export.export(
        model, (torch.randn(3, 2, 8, 8),), dynamic_shapes=(({0: DYNAMIC},),)
    )
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("scatter_add" in t for t in targets), targets
    assert not any("sparse" in t for t in targets), targets
    xs = [torch.randn(n, 2, 8, 8) for n in (1, 5)]
    with torch.no_grad():
        expected = [net(x) for x in xs]
    for x, want in zip(xs, expected, strict=True):
        close(program.module()(x), want)
    out, data = tmp_path / "net.pt2", tmp_path / "data.pt"
    torch.export.save(program, out)
    torch.save({"xs": xs, "expected": expected}, data)
    done = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, str(out), str(data)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_torch_onnx_export_dynamo_matches_the_original_in_onnxruntime(
    converted: tuple[nn.Module, nn.Module],
) -> None:
    net, model = converted
    onnx_program = torch.onnx.export(
        model,
        (torch.randn(2, 2, 8, 8),),
        dynamo=True,
        dynamic_shapes=(({0: DYNAMIC},),),
        verbose=False,
    )
    proto = onnx_program.model_proto
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert "ScatterND" in ops or "ScatterElements" in ops, ops
    for n in (1, 5):
        x = torch.randn(n, 2, 8, 8)
        with torch.no_grad():
            close(ort_run(proto, x), net(x))


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_layer_state_dict_and_dtype_keep_the_exportable_form(layout: str) -> None:
    """After load_state_dict and .double(), the export path reads the new T, not stale copies."""
    torch.manual_seed(4)
    conv, other = nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(2, 3, 3, padding=1)
    fc = to_fully_connected(conv, (2, 7), sparse=True, layout=layout)  # type: ignore[arg-type]
    target = to_fully_connected(other, (2, 7), sparse=True, layout=layout)  # type: ignore[arg-type]
    buf = io.BytesIO()
    torch.save(target.state_dict(), buf)
    buf.seek(0)
    fc.load_state_dict(torch.load(buf, weights_only=True))
    fc = fc.double()
    assert fc._values.data_ptr() == fc.weight.values().data_ptr()  # aliases, not a second copy
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    program = torch.export.export(fc, (x,), dynamic_shapes=({0: DYNAMIC},))
    with torch.no_grad():
        expected = other.double()(x)
    torch.testing.assert_close(program.module()(x), expected)
    torch.testing.assert_close(fc(x), expected)


def test_torchscript_onnx_exporter_sums_duplicate_rows(tmp_path: Path) -> None:
    """The legacy (dynamo=False) exporter: every output row gets several products, so a scatter
    that overwrote instead of adding would be far off."""
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3).eval()
    fc = to_fully_connected(conv, (2, 6, 6), sparse=True).eval()
    out = tmp_path / "fc.onnx"
    torch.onnx.export(
        fc,
        (torch.randn(2, 2, 6, 6),),
        str(out),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
        opset_version=17,
    )
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    for n in (1, 5):
        x = torch.randn(n, 2, 6, 6)
        with torch.no_grad():
            close(ort_run(proto, x), conv(x))


def test_deepcopy_keeps_the_coo_buffers_aliased() -> None:
    import copy

    conv = nn.Conv1d(2, 3, 3)
    fc = to_fully_connected(conv, (2, 7), sparse=True, layout="coo")
    twin = copy.deepcopy(fc)
    assert twin._values.data_ptr() == twin.weight.values().data_ptr()
    assert twin._values.data_ptr() != fc._values.data_ptr()
    x = torch.randn(2, 2, 7)
    program = torch.export.export(twin, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), conv(x))
