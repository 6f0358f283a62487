"""ONNX out: the LC / FC / sparse FC forms, folded networks and NNet files.

Oracles: the original PyTorch model (eager) and onnxruntime running the written graph; the NNet
file is read back by the small reader below, written from the format's description (sisl/NNet
README), not by convtool.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from convtool.errors import ConvtoolError
from tests.safety_helpers import one_line_error, run

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from convtool.export import fold_onnx, folded_to_onnx, rewrite_onnx_convs  # noqa: E402
from convtool.export.torch_onnx import export_onnx  # noqa: E402

INPUT = (1, 3, 10, 10)
FOLDED_OPS = {"Flatten", "MatMul", "Add", "Relu"}


class Net(nn.Module):
    """Groups, dilation, reflect padding, BatchNorm, average pooling, ReLU, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=2, dilation=2, padding_mode="reflect")
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.head(x.flatten(1))


def make_net() -> nn.Module:
    """Deterministic weights and non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.2, 0.2)
    return net.eval()


class PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x))).flatten(1)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return make_net()


@pytest.fixture(scope="module")
def plain(net: nn.Module):  # type: ignore[no-untyped-def]
    """The original model as plain ONNX (Conv nodes), exported once for the whole module."""
    return export_onnx(net, INPUT)


def ort_run(model, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check_matches(model, net: nn.Module, batches=(1, 5)) -> None:  # type: ignore[no-untyped-def]
    """onnx.checker passes, and onnxruntime reproduces the PyTorch model at every batch size."""
    onnx.checker.check_model(model, full_check=True)
    for n in batches:
        x = torch.randn(n, *INPUT[1:])
        expected = net(x).detach().numpy()
        got = ort_run(model, x.numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_plain_export_has_convs_and_a_dynamic_batch(plain) -> None:  # type: ignore[no-untyped-def]
    assert sum(n.op_type == "Conv" for n in plain.graph.node) == 3
    batch = plain.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch.HasField("dim_value")  # symbolic


@pytest.mark.parametrize(
    ("to", "sparse", "form", "ops"),
    [
        ("lc", False, "auto", {"Gather", "MatMul"}),
        ("fc", False, "auto", {"Gemm"}),
        ("fc", True, "ell", {"Gather", "Mul", "ReduceSum"}),
        ("fc", True, "scatter", {"Gather", "Mul", "ScatterND"}),
    ],
)
def test_every_form_matches_the_model(plain, net, to, sparse, form, ops) -> None:  # type: ignore[no-untyped-def]
    model, report = rewrite_onnx_convs(plain, to, sparse, sparse_form=form)
    kinds = {n.op_type for n in model.graph.node}
    assert "Conv" not in kinds
    assert ops <= kinds
    assert [r["name"] for r in report] == ["conv1", "conv2", "conv3"]
    check_matches(model, net)


def test_layers_selects_convs_by_module_name(plain, net) -> None:  # type: ignore[no-untyped-def]
    model, report = rewrite_onnx_convs(plain, "fc", True, layers="conv2")
    assert [r["name"] for r in report] == ["conv2"]
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 2
    check_matches(model, net, batches=(2,))
    with pytest.raises(ConvtoolError, match="matches no conv"):
        rewrite_onnx_convs(plain, "fc", layers="nope*")


def test_fold_dense_is_the_verifier_chain(plain, net) -> None:  # type: ignore[no-untyped-def]
    folded = folded_to_onnx(fold_onnx(plain))
    ops = [n.op_type for n in folded.graph.node]
    assert set(ops) <= FOLDED_OPS
    assert ops == ["Flatten", *["MatMul", "Add", "Relu"] * 3, "MatMul", "Add"]
    check_matches(folded, net, batches=(1, 4))


def test_fold_sparse_keeps_stretches_sparse(plain, net) -> None:  # type: ignore[no-untyped-def]
    dense, sparse = fold_onnx(plain), fold_onnx(plain, sparse=True)
    for d, s in zip(dense.layers, sparse.layers, strict=True):
        assert s.sparse and not d.sparse
        assert s.weight.nnz == np.count_nonzero(d.weight)
        np.testing.assert_array_equal(s.weight.toarray(), d.weight)
    assert sparse.layers[0].weight.nnz < 0.5 * np.prod(sparse.layers[0].weight.shape)
    check_matches(folded_to_onnx(sparse), net, batches=(1, 3))


# --------------------------------------------------------------------------------- NNet
def read_nnet(path: Path) -> dict:  # type: ignore[type-arg]
    """A reader written from the NNet format description (sisl/NNet README)."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if not ln.startswith("//")]

    def values(line: str) -> list[float]:
        return [float(v) for v in line.rstrip(",").split(",")]

    n_layers, n_in, n_out, _ = (int(v) for v in values(lines[0]))
    sizes = [int(v) for v in values(lines[1])]
    mins, maxes, means, ranges = (np.array(values(lines[i])) for i in range(3, 7))
    at, weights, biases = 7, [], []
    for k in range(n_layers):
        rows, cols = sizes[k + 1], sizes[k]
        weights.append(np.array([values(lines[at + r]) for r in range(rows)]).reshape(rows, cols))
        at += rows
        biases.append(np.array([values(lines[at + r])[0] for r in range(rows)]))
        at += rows
    assert at == len(lines) and sizes[0] == n_in and sizes[-1] == n_out
    return dict(weights=weights, biases=biases, mins=mins, maxes=maxes, means=means, ranges=ranges)


def eval_nnet(nnet: dict, x: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    """Clip to the bounds, normalise, ReLU after every layer but the last, de-normalise."""
    h = (np.clip(x, nnet["mins"], nnet["maxes"]) - nnet["means"][:-1]) / nnet["ranges"][:-1]
    for k, (w, b) in enumerate(zip(nnet["weights"], nnet["biases"], strict=True)):
        h = h @ w.T + b
        if k < len(nnet["weights"]) - 1:
            h = np.maximum(h, 0)
    return h * nnet["ranges"][-1] + nnet["means"][-1]


# --------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "net.pt"
    torch.save(make_net().state_dict(), path)
    return path


MODEL = ["--model", "tests.test_onnx_export:make_net", "--input-shape", "1,3,10,10"]


def test_cli_nnet_reads_back_to_the_model(weights: Path, tmp_path: Path, net) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "net.nnet"
    result = run("convert", weights, *MODEL, "--to", "fc", "-o", out, "--input-bounds", "-9,9")
    assert result.exit_code == 0, result.stderr
    nnet = read_nnet(out)
    assert [w.shape[0] for w in nnet["weights"]] == [6 * 10 * 10, 8 * 2 * 2, 4 * 2 * 2, 5]
    x = torch.randn(4, *INPUT[1:])
    expected = net(x).detach().numpy()
    got = eval_nnet(nnet, x.reshape(4, -1).numpy().astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_cli_fold_onnx_and_onnx_source(weights: Path, tmp_path: Path, net) -> None:  # type: ignore[no-untyped-def]
    folded = tmp_path / "folded.onnx"
    result = run("convert", weights, *MODEL, "--to", "fc", "--fold", "-o", folded, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert set(info["ops"]) <= FOLDED_OPS
    check_matches(onnx.load(str(folded)), net)
    # an ONNX source: every Conv node rewritten, the rest kept
    source = tmp_path / "plain.onnx"
    onnx.save(export_onnx(net, INPUT), str(source))
    out = tmp_path / "lc.onnx"
    result = run("convert", source, "--to", "lc", "-o", out)
    assert result.exit_code == 0, result.stderr
    check_matches(onnx.load(str(out)), net)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "fc", "--fold", "-o", "x.pt2"], "--fold writes a folded network"),
        (["--to", "lc", "--fold", "-o", "x.onnx"], "use --to fc"),
        (["--to", "fc", "--sparse", "-o", "x.nnet"], "dense matrices"),
        (["--to", "fc", "-o", "x.onnx", "--opset", "9"], "--opset must be"),
        (["--to", "fc", "-o", "x.pt", "--opset", "18"], "--opset applies"),
    ],
)
def test_cli_refuses_flags_before_loading(tmp_path: Path, args, message) -> None:  # type: ignore[no-untyped-def]
    # the source does not even exist: the flags are refused before it is opened
    args = [a if not a.startswith("x.") else str(tmp_path / a) for a in args]
    result = run("convert", tmp_path / "missing.pt", *args)
    assert message in one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_fold_refuses_max_pooling_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convtool.export import torch_onnx

    def no_export(*a: object, **k: object) -> None:
        raise AssertionError("exported before refusing")

    monkeypatch.setattr(torch_onnx, "export_onnx", no_export)
    monkeypatch.setattr("convtool.export.pipeline.export_onnx", no_export)
    path = tmp_path / "pool.pt"
    torch.save(PoolNet().state_dict(), path)
    out = tmp_path / "pool.onnx"
    result = run(
        "convert",
        path,
        "--model",
        "tests.test_onnx_export:PoolNet",
        "--input-shape",
        "1,3,8,8",
        "--to",
        "fc",
        "--fold",
        "-o",
        out,
    )
    assert "max_pool2d" in one_line_error(result)
    assert not out.exists()


def test_size_refusal_comes_before_the_export(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_export(*a: object, **k: object) -> None:
        raise AssertionError("exported before refusing")

    monkeypatch.setattr("convtool.export.pipeline.export_onnx", no_export)
    for extra in (["--to", "fc"], ["--to", "fc", "--fold"]):
        out = tmp_path / "big.onnx"
        result = run("convert", weights, *MODEL, *extra, "-o", out, "--max-memory", "64K")
        assert "--max-memory is 64.0 KiB" in one_line_error(result)
        assert not out.exists()


def _graph(nodes, inits, in_shape, out_shape):  # type: ignore[no-untyped-def]
    from onnx import TensorProto, helper, numpy_helper

    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
            [numpy_helper.from_array(v, k) for k, v in inits.items()],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    model.ir_version = 10  # what onnxruntime releases of 2024+ read
    return model


def test_fold_refuses_skip_connections_and_max_pool_by_name() -> None:
    from onnx import helper

    w = np.random.default_rng(0).standard_normal((2, 2, 3, 3)).astype(np.float32)
    skip = _graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Conv", ["r", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r2"]),
            helper.make_node("Add", ["r2", "r"], ["y"]),
        ],
        {"w": w},
        ["N", 2, 4, 4],
        ["N", 2, 4, 4],
    )
    with pytest.raises(ConvtoolError, match="skip connection"):
        fold_onnx(skip)
    pool = _graph(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])],
        {},
        ["N", 2, 4, 4],
        ["N", 2, 2, 2],
    )
    with pytest.raises(ConvtoolError, match="MaxPool node"):
        fold_onnx(pool)


def test_onnx_conv_variants_match_onnxruntime() -> None:
    """Asymmetric pads, SAME_UPPER, Conv1d and ConvTranspose vs onnxruntime on the original."""
    from onnx import helper

    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 2, 2)).astype(np.float32)
    wt = rng.standard_normal((4, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(4).astype(np.float32)
    model = _graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[0, 2], strides=[2]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["c"], auto_pad="SAME_UPPER", group=2),
            helper.make_node(
                "ConvTranspose",
                ["c", "wt"],
                ["y"],
                strides=[2],
                pads=[1, 1],
                output_padding=[1],
                group=2,
            ),
        ],
        {"w1": w1, "b1": b1, "w2": w2, "wt": wt},
        ["N", 3, 11],
        ["N", 6, 12],
    )
    x = rng.standard_normal((3, 3, 11)).astype(np.float32)
    expected = ort_run(model, x)
    assert expected.shape == (3, 6, 12)
    for sparse in (False, True):
        rewritten, _ = rewrite_onnx_convs(model, "fc", sparse)
        onnx.checker.check_model(rewritten, full_check=True)
        np.testing.assert_allclose(ort_run(rewritten, x), expected, rtol=1e-4, atol=1e-5)
    folded = folded_to_onnx(fold_onnx(model))
    np.testing.assert_allclose(ort_run(folded, x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConvtoolError, match="ConvTranspose"):
        rewrite_onnx_convs(model, "lc")


ISOLATED = textwrap.dedent(
    """
    import sys
    sys.modules["convtool"] = None  # importing convtool must fail here
    import numpy as np, onnxruntime as ort, torch, warnings
    warnings.simplefilter("ignore")
    program = torch.export.load(sys.argv[1])
    data = torch.load(sys.argv[2])
    torch.testing.assert_close(program.module()(data["x"]), data["expected"])
    onnx_program = torch.onnx.export(program, (), dynamo=True, verbose=False)
    s = ort.InferenceSession(onnx_program.model_proto.SerializeToString())
    got = s.run(None, {s.get_inputs()[0].name: data["x"].numpy()})[0]
    np.testing.assert_allclose(got, data["expected"].numpy(), rtol=1e-4, atol=1e-5)
    print("ok")
    """
)


def test_sparse_fc_pt2_runs_without_convtool_and_exports_to_onnx(
    weights: Path, tmp_path: Path, net: nn.Module
) -> None:
    out = tmp_path / "sparse.pt2"
    result = run("convert", weights, *MODEL, "--to", "fc", "--sparse", "-o", out)
    assert result.exit_code == 0, result.stderr
    x = torch.randn(3, *INPUT[1:])
    data = tmp_path / "data.pt"
    torch.save({"x": x, "expected": net(x).detach()}, data)
    done = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, str(out), str(data)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_fold_evaluates_onnx_linear_ops_as_onnxruntime_does() -> None:
    """Reflect Pad, BatchNormalization, padded AveragePool (count_include_pad=0), Gemm."""
    from onnx import helper

    rng = np.random.default_rng(2)
    f32 = np.float32
    inits = {
        "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64),
        "w": rng.standard_normal((4, 2, 3, 3)).astype(f32),
        "s": rng.uniform(0.5, 1.5, 4).astype(f32),
        "b": rng.standard_normal(4).astype(f32),
        "m": rng.standard_normal(4).astype(f32),
        "v": rng.uniform(0.5, 2, 4).astype(f32),
        "g": rng.standard_normal((3, 4 * 3 * 4)).astype(f32),
        "gb": rng.standard_normal(3).astype(f32),
    }
    model = _graph(
        [
            helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
            helper.make_node("Conv", ["p", "w"], ["c"], dilations=[2, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], epsilon=1e-3),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node(
                "AveragePool",
                ["r"],
                ["a"],
                kernel_shape=[2, 2],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                count_include_pad=0,
            ),
            helper.make_node("Flatten", ["a"], ["f"]),
            helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1, alpha=0.5),
        ],
        inits,
        ["N", 2, 6, 5],
        ["N", 3],
    )
    x = rng.standard_normal((4, 2, 6, 5)).astype(f32)
    expected = ort_run(model, x)
    net = fold_onnx(model)
    assert [layer.relu for layer in net.layers] == [True, False]
    folded = folded_to_onnx(net)
    assert {n.op_type for n in folded.graph.node} <= FOLDED_OPS
    np.testing.assert_allclose(ort_run(folded, x), expected, rtol=1e-4, atol=1e-5)


def test_bad_target_refused_before_any_work() -> None:
    # One check (forms.model_target) for convert_model, model_to_onnx and rewrite_onnx_convs.
    import convtool
    from convtool.export.pipeline import model_to_onnx

    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    for call in (
        lambda **kw: model_to_onnx(model, (1, 1, 5, 5), **kw),
        lambda **kw: rewrite_onnx_convs(object(), **kw),  # not even a model: refused first
        lambda **kw: convtool.convert_model(model, (1, 1, 5, 5), **kw),
    ):
        with pytest.raises(ConvtoolError, match="`to` must be 'lc' or 'fc'") as bad:
            call(to="toeplitz")
        assert bad.value.params == ("to",)
        with pytest.raises(ConvtoolError, match="sparse=True applies to the fully-connected"):
            call(to="lc", sparse=True)
