"""ONNX models as a SOURCE: every Conv / ConvTranspose node, checked against onnxruntime.

Graphs come from `torch.onnx.export` and from `onnx.helper` for what torch never writes
(auto_pad SAME_LOWER, asymmetric pads, Constant-node weights, a conv inside an If branch,
ConvTranspose output_shape). The oracle is onnxruntime running the model file itself, or the
original torch layer's autograd Jacobian.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from convtool.cli import app
from convtool.errors import ConvtoolError
from convtool.inventory import layer_bias_vector, layer_matrix, layer_output_shape
from convtool.models import trace_source
from convtool.source import SourceOptions, load_source

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(0)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _apply(layer, x: np.ndarray) -> np.ndarray:
    """T @ x + b for a batch `(N, C, *spatial)`, through convtool's matrix."""
    sample = tuple(x.shape[1:])
    t = layer_matrix(layer, sample).double()
    b = layer_bias_vector(layer, sample, torch.float64)
    flat = torch.from_numpy(x).double().reshape(x.shape[0], -1)
    y = flat @ t.T + b
    return y.reshape(x.shape[0], *layer_output_shape(layer, sample)).numpy()


def _one_node(tmp_path: Path, op: str, w: np.ndarray, x_shape: tuple, **attrs) -> Path:
    out_channels = w.shape[1] * attrs.get("group", 1) if op == "ConvTranspose" else w.shape[0]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(_f32(out_channels), "b")]
    node = helper.make_node(op, ["x", "w", "b"], ["y"], name="node", **attrs)
    return _save(
        tmp_path / f"{op}.onnx",
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )


CASES = {
    "same_lower_2d_stride2": (
        "Conv",
        (4, 3, 3, 2),
        (1, 3, 7, 6),
        {"auto_pad": "SAME_LOWER", "strides": [2, 1]},
    ),
    "same_upper_1d_stride3": (
        "Conv",
        (2, 2, 4),
        (1, 2, 11),
        {"auto_pad": "SAME_UPPER", "strides": [3]},
    ),
    "asymmetric_2d_dilated": (
        "Conv",
        (4, 2, 2, 3),
        (1, 4, 6, 7),
        {"pads": [0, 2, 1, 0], "dilations": [2, 1], "group": 2},
    ),
    "valid_3d": (
        "Conv",
        (2, 1, 2, 2, 2),
        (1, 1, 4, 3, 5),
        {"auto_pad": "VALID", "strides": [1, 2, 1]},
    ),
    "transpose_output_shape": (
        "ConvTranspose",
        (3, 2, 3, 3),
        (1, 3, 4, 5),
        {"strides": [2, 2], "output_shape": [8, 10]},
    ),
    "transpose_same_upper_1d": (
        "ConvTranspose",
        (2, 3, 3),
        (1, 2, 5),
        {"strides": [2], "auto_pad": "SAME_UPPER"},
    ),
    "transpose_grouped_same_lower": (
        "ConvTranspose",
        (4, 1, 2, 3),
        (1, 4, 3, 3),
        {"group": 2, "strides": [1, 2], "dilations": [2, 1], "auto_pad": "SAME_LOWER"},
    ),
    "transpose_asym_pads_outpad": (
        "ConvTranspose",
        (2, 1, 3, 2),
        (1, 2, 3, 4),
        {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_node_matrix_equals_onnxruntime(tmp_path: Path, case: str) -> None:
    op, w_shape, x_shape, attrs = CASES[case]
    path = _one_node(tmp_path, op, _f32(*w_shape), x_shape, **attrs)
    src = load_source(path, SourceOptions())
    (layer,) = src.layers
    assert layer.name == "node" and layer.input_shape == x_shape[1:]
    x = _f32(3, *x_shape[1:])
    expected = _ort(path, {"x": x}) if x_shape[0] == 3 else None
    if expected is None:  # the model's input is fixed at batch 1: run each sample
        expected = np.concatenate([_ort(path, {"x": x[i : i + 1]}) for i in range(3)])
    np.testing.assert_allclose(_apply(layer, x), expected, rtol=1e-4, atol=1e-4)


def test_constant_weights_and_a_conv_inside_an_if_branch(tmp_path: Path) -> None:
    w_then, w_main = _f32(2, 2, 3), _f32(2, 2, 2)
    branch_node = helper.make_node("Conv", ["h", "wc"], ["t"], name="inner", pads=[2, 0])
    const = helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(w_then, "wc"))
    then_g = helper.make_graph(
        [const, branch_node],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Constant", [], ["wm"], value=numpy_helper.from_array(w_main, "wm")),
        helper.make_node("Conv", ["x", "wm"], ["h"], name="first", auto_pad="SAME_LOWER"),
        helper.make_node(
            "If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g
        ),
    ]
    path = _save(
        tmp_path / "if.onnx",
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 9]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [],
    )
    src = load_source(path, SourceOptions())
    assert [layer.name for layer in src.layers] == ["first", "branch/then_branch/inner"]
    # symbolic batch: shapes come once the example input fixes it
    trace_source(src, (4, 2, 9))
    first, inner = src.layers
    assert first.input_shape == (2, 9) and inner.input_shape == (2, 9)
    x = _f32(4, 2, 9)
    h = _apply(first, x)
    np.testing.assert_allclose(
        h, _ort(path, {"x": x, "cond": np.array(False)}), rtol=1e-4, atol=1e-4
    )
    y = _apply(inner, h.astype(np.float32))
    np.testing.assert_allclose(
        y, _ort(path, {"x": x, "cond": np.array(True)}), rtol=1e-4, atol=1e-4
    )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.line = nn.Conv1d(2, 3, 5, padding=2, dilation=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(torch.relu(self.down(x)))
        return self.line(y.flatten(2))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Net]:
    torch.manual_seed(0)
    model = Net().eval()
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 8, 6),),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    return path, model


def test_torch_exported_model_layers_equal_the_torch_layers(exported: tuple[Path, Net]) -> None:
    path, model = exported
    src = load_source(path, SourceOptions())
    trace_source(src, (1, 3, 8, 6))
    assert len(src.layers) == 3
    torch_layers = [model.down, model.up, model.line]
    for layer, conv in zip(src.layers, torch_layers, strict=True):
        sample = layer.input_shape
        assert sample is not None
        x = torch.randn(1, *sample, dtype=torch.float64)
        ref = conv.double()
        rows = int(np.prod(layer_output_shape(layer, sample)))
        jac = torch.autograd.functional.jacobian(lambda v, ref=ref: ref(v), x)
        torch.testing.assert_close(
            layer_matrix(layer, sample).double(), jac.reshape(rows, -1), rtol=1e-6, atol=1e-6
        )
        conv.float()


def test_cli_walkthrough(exported: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = exported
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(path), "-i", "1,3,8,6", "--json"])
    assert r.exit_code == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    assert [x["kind"] for x in layers] == ["Conv2d", "ConvTranspose2d", "Conv1d"]
    assert layers[1]["output_shape"] == [2, 8, 6]
    name = layers[0]["name"]
    r = runner.invoke(app, ["count-params", str(path), "-i", "1,3,8,6", "--json"])
    assert r.exit_code == 0, r.stderr
    counts = json.loads(r.stdout)
    assert counts["layers"][0]["conv_params"] == 4 * 3 * 9 + 4
    out = tmp_path / "T.npy"
    r = runner.invoke(
        app, ["toeplitz", str(path), "--layer", name, "-i", "1,3,8,6", "-o", str(out)]
    )
    assert r.exit_code == 0, r.stderr
    assert np.load(out).shape == (4 * 4 * 3, 3 * 8 * 6)
    r = runner.invoke(app, ["verify", str(path), "-i", "1,3,8,6", "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    forms = {(c["name"], c["form"]): c["status"] for c in report["layers"]}
    assert forms[(name, "onnx_node")] == "passed"
    assert forms[(name, "toeplitz_sparse")] == "passed"
    assert "failed" not in forms.values()
    # convert of an ONNX source writes ONNX: any other output is refused before work
    r = runner.invoke(app, ["convert", str(path), "--to", "lc", "-o", str(tmp_path / "c.pt2")])
    assert r.exit_code == 2 and "-o c.onnx" in r.stderr and not (tmp_path / "c.pt2").exists()


def test_bad_onnx_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all" * 3)
    with pytest.raises(ConvtoolError, match="ONNX"):
        load_source(bad, SourceOptions())
    w = numpy_helper.from_array(_f32(2, 1, 3), "w")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    w.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w],
    )
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(ConvtoolError, match="outside its own folder"):
        load_source(evil, SourceOptions())


def test_spectrum_leaves_out_a_node_with_asymmetric_pads(tmp_path: Path) -> None:
    """Its matrix is the conv's times a padding map, whose singular values differ from the
    conv's: it is named and left out, not reported as if it were one conv."""
    from typer.testing import CliRunner

    from convtool.cli import app

    op, w_shape, x_shape, attrs = CASES["asymmetric_2d_dilated"]
    path = _one_node(tmp_path, op, _f32(*w_shape), x_shape, **attrs)
    result = CliRunner().invoke(app, ["spectrum", str(path), "--json"])
    assert result.exit_code == 2, result.output
    assert "asymmetric pads" in result.stderr and "Traceback" not in result.stderr
