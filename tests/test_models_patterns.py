"""Models as users write them: conv subclasses, functional convs, extra forward arguments.

Every model is written here; every check compares with the original model itself (eager, at
another batch size than the example's, or loaded back by torch) or with the autograd Jacobian.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

from convtool.cli import app
from convtool.errors import ConvtoolError
from convtool.inventory import capture, layer_matrix, select
from convtool.models import (
    FunctionalConvWarning,
    convert_model,
    convert_with_report,
    export_converted,
)
from convtool.params import count_params
from convtool.verification import verify

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")


class ToeplitzLinear(nn.Conv1d):
    """A 'Toeplitz linear' layer: (N, L) -> (N, L'), a Conv1d around a reshape."""

    def __init__(self, length: int, kernel: int) -> None:
        super().__init__(1, 1, kernel, padding=kernel // 2, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.unsqueeze(-2)).squeeze(-2)


class OwnConv(nn.Conv1d):
    """A subclass that calls F.conv1d with its own weight itself, scaled after."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * F.conv1d(x, self.weight, self.bias, self.stride, self.padding)


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.toe = ToeplitzLinear(12, 5)
        self.own = OwnConv(1, 3, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (N, 12)
        y = torch.tanh(self.toe(x))
        return self.own(y.unsqueeze(1)).flatten(1)


class Filterbank(nn.Module):
    """An STFT-like front end: F.conv1d with a buffer kernel, then a conv module."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filters", torch.randn(6, 1, 8))
        self.mix = nn.Conv1d(6, 2, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, T)
        spec = F.conv1d(x, self.filters, stride=4).abs()
        return self.mix(spec)


class Dynamic(nn.Module):
    """A conv whose kernel is computed from the input: cannot become a fixed matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (1, 2, L)
        kernel = x[:, :, :3].reshape(2, 1, 3)
        return F.conv1d(self.conv(x), kernel, padding=1, groups=2)


class WithRate(nn.Module):
    """forward(x, sr): a keyword argument the model needs on every run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 5, padding=2)

    def forward(self, x: Tensor, sr: int = 8000) -> Tensor:
        return self.conv(x) * (sr / 16000.0)


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p)
    return model.eval()


# ---------------------------------------------------------------------------------- subclasses
@pytest.mark.parametrize(("to", "sparse"), [("lc", False), ("fc", False), ("fc", True)])
def test_conv_subclass_keeps_its_forward_at_any_batch(to: str, sparse: bool) -> None:
    model = _seeded(SubclassNet(), 0)
    converted, report = convert_with_report(model, (1, 12), to=to, sparse=sparse)
    assert [c.name for c in report.layers] == ["toe", "own"]
    assert report.layers[0].input_shape == (1, 12)  # the conv's input, after the reshape
    for batch in (1, 5):
        x = torch.randn(batch, 12)
        torch.testing.assert_close(converted(x), model(x))
    program = export_converted(converted, (1, 12))  # a .pt2 with a dynamic batch dim
    x = torch.randn(5, 12)
    torch.testing.assert_close(program.module()(x), model(x))


def test_subclass_matrix_is_the_jacobian() -> None:
    model = _seeded(SubclassNet(), 1)
    inv = capture(model, (1, 12))
    toe = inv.get("toe")
    assert toe is not None and toe.input_shape == (1, 12)
    x = torch.randn(1, 1, 12, dtype=torch.float64)
    conv = nn.Conv1d(1, 1, 5, padding=2).double()
    conv.weight.data.copy_(toe.weight)
    conv.bias.data.copy_(toe.bias)
    jac = torch.autograd.functional.jacobian(lambda v: conv(v), x).reshape(12, 12)
    torch.testing.assert_close(layer_matrix(toe, (1, 12)).double(), jac)


# ---------------------------------------------------------------------------------- functional
def test_functional_conv_with_a_buffer_weight_is_a_layer_everywhere() -> None:
    model = _seeded(Filterbank(), 2)
    shape = (1, 1, 64)
    inv = capture(model, shape)
    assert [layer.name for layer in inv.layers] == ["F.conv1d#0", "mix"]
    front = inv.layers[0]
    assert front.call == "functional" and front.spec.stride == (4,)
    assert front.input_shape == (1, 64)
    # its matrix is the Jacobian of the functional call alone
    x = torch.randn(1, 1, 64)
    jac = torch.autograd.functional.jacobian(
        lambda v: F.conv1d(v, model.filters, stride=4), x
    ).reshape(6 * 15, 64)
    torch.testing.assert_close(layer_matrix(front, (1, 64)), jac)
    # count, verify and convert see it
    counts = count_params(model, shape)
    assert [c.name for c in counts.layers] == ["F.conv1d#0", "mix"]
    assert counts.layers[0].fc_nonzero == 6 * 15 * 8
    report = verify(model, shape, to="all", trials=1)
    assert report.passed, report.failures
    assert {c.name for c in report.checks} == {"F.conv1d#0", "mix"}
    converted = convert_model(model, shape, to="fc", sparse=True)
    assert set(converted.input_shapes) == {"F.conv1d#0", "mix"}
    x = torch.randn(5, 1, 64)
    torch.testing.assert_close(converted(x), model(x))
    assert select([layer.name for layer in inv.layers], "F.*") == ["F.conv1d#0"]


def test_weight_computed_from_the_input_is_listed_never_converted() -> None:
    model = _seeded(Dynamic(), 3)
    with pytest.warns(FunctionalConvWarning, match=r"F\.conv1d#0.*computed from the input"):
        converted = convert_model(model, (1, 2, 9), to="lc")
    assert set(converted.input_shapes) == {"conv"}
    x = torch.randn(1, 2, 9)
    torch.testing.assert_close(converted(x), model(x))


def test_a_call_seen_at_another_size_runs_the_original_conv() -> None:
    model = _seeded(Filterbank(), 4)
    converted = convert_model(model, (1, 1, 64), to="lc")
    x = torch.randn(2, 1, 40)  # not the size the forms were built for: still exact
    torch.testing.assert_close(converted(x), model(x))


# ---------------------------------------------------------------------------------- kwargs
def test_forward_kwargs_eager_and_torchscript(tmp_path: Path) -> None:
    model = _seeded(WithRate(), 5)
    kwargs = {"sr": 22050}
    converted = convert_model(model, (1, 1, 16), to="lc", forward_kwargs=kwargs)
    x = torch.randn(5, 1, 16)
    torch.testing.assert_close(converted(x, **kwargs), model(x, **kwargs))
    program = export_converted(converted, (1, 1, 16), kwargs)  # sr fixed into the program
    torch.testing.assert_close(program.module()(x), model(x, **kwargs))
    assert verify(model, (1, 1, 16), trials=1, forward_kwargs=kwargs).passed

    class NeedsRate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3)

        def forward(self, x: Tensor, sr: int) -> Tensor:
            return self.conv(x) * float(sr)

    scripted = torch.jit.script(_seeded(NeedsRate(), 6))
    with pytest.raises(ConvtoolError, match=r"`forward_kwargs`.*`layer_input_shape`"):
        capture(scripted, (1, 1, 10))
    inv = capture(scripted, (1, 1, 10), {"sr": 16000})
    assert inv.input_shapes == {"conv": (1, 10)}
    path = tmp_path / "rate.pt"
    scripted.save(str(path))
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(path), "-i", "1,1,10", "--json"])
    assert r.exit_code == 2 and "--forward-kwargs" in r.stderr
    assert "--layer-input-shape" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(
        app, ["inspect", str(path), "-i", "1,1,10", "--forward-kwargs", '{"sr": 16000}', "--json"]
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["layers"][0]["input_shape"] == [1, 10]
    r = runner.invoke(
        app, ["convert", str(path), "-i", "1,1,10", "--to", "lc", "-o", str(tmp_path / "c.pt2")]
    )
    assert r.exit_code == 2 and "TorchScript" in r.stderr and ".pt2" in r.stderr
    assert not (tmp_path / "c.pt2").exists()


def test_layer_input_shape_needs_no_run(tmp_path: Path) -> None:
    """One layer's matrix from a model that cannot run without arguments it was not given."""
    model = _seeded(WithRate(), 7)
    scripted = torch.jit.script(model)
    path = tmp_path / "m.pt"
    scripted.save(str(path))
    out = tmp_path / "T.npz"
    r = CliRunner().invoke(
        app,
        ["toeplitz", str(path), "--layer", "conv", "--layer-input-shape", "1,16", "-o", str(out)],
    )
    assert r.exit_code == 0, r.stderr
    import scipy.sparse

    r = CliRunner().invoke(
        app, ["inspect", str(path), "--layer", "conv", "--layer-input-shape", "1,16", "--json"]
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["layers"][0]["output_shape"] == [4, 16]
    t = torch.from_numpy(scipy.sparse.load_npz(out).toarray())
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    conv = model.conv.double()
    jac = torch.autograd.functional.jacobian(lambda v: conv(v), x).reshape(4 * 16, 16)
    torch.testing.assert_close(t.double(), jac)


# ---------------------------------------------------------------------------------- errors
def test_unknown_format_lists_every_accepted_one(tmp_path: Path) -> None:
    path = tmp_path / "model.xyz"
    path.write_bytes(b"\x00" * 32)
    r = CliRunner().invoke(app, ["inspect", str(path)])
    assert r.exit_code == 2
    for fmt in (".npy", ".npz", ".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".onnx"):
        assert fmt in r.stderr
    assert "TorchScript" in r.stderr


def test_convert_of_several_kernels_suggests_an_option_that_exists(tmp_path: Path) -> None:
    path = tmp_path / "two.pt"
    torch.save({"a.weight": torch.randn(2, 1, 3), "b.weight": torch.randn(2, 2, 3)}, path)
    r = CliRunner().invoke(
        app, ["convert", str(path), "--to", "lc", "-i", "1,8", "-o", str(tmp_path / "o.pt2")]
    )
    assert r.exit_code == 2 and "--model MODULE:CALLABLE" in r.stderr
    assert "--layer " not in r.stderr.replace("toeplitz two.pt --layer", "")
    help_text = CliRunner().invoke(app, ["convert", "--help"]).stdout
    assert "--model" in help_text


def test_selector_is_one_for_every_command() -> None:
    names = ["stem", "features.0", "frontend.F.conv1d#0", "frontend.F.conv1d#1"]
    assert select(names, "frontend.*") == names[2:]
    assert select(names, ["stem", "frontend.F.conv1d#1"]) == ["stem", names[3]]
    with pytest.raises(ConvtoolError, match=r"'head' matches no conv layer"):
        select(names, "stem,head")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(names, None)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_converted_functional_and_subclass_calls_reload(tmp_path: Path, suffix: str) -> None:
    from convtool.converted import load_converted
    from convtool.io import model_files

    for make, shape in ((Filterbank, (1, 1, 64)), (SubclassNet, (1, 12))):
        model = _seeded(make(), 8)
        converted, report = convert_with_report(model, shape, to="fc", sparse=True)
        path = tmp_path / f"{make.__name__}{suffix}"
        meta = model_files.metadata(report.to_dict(), "test", "state_dict", version="test")
        model_files.write_state_dict(path, converted.state_dict(), meta)
        rebuilt = load_converted(make(), path)  # fresh weights: everything comes from the file
        x = torch.randn(5, *shape[1:])
        torch.testing.assert_close(rebuilt(x), model(x))


def test_a_forward_that_refuses_grad_is_still_inventoried() -> None:
    class Numpyish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("kernel", torch.randn(3, 1, 3))

        def forward(self, x: Tensor) -> Tensor:
            scale = float(x.numpy().std() + 1.0)  # fails on a tensor that requires grad
            x.add_(0.0)  # in-place on the input
            return F.conv1d(x, self.kernel) / scale

    model = Numpyish().eval()
    inv = capture(model, (1, 1, 10))
    assert inv.input_shapes == {"F.conv1d#0": (1, 10)}
    converted = convert_model(model, (1, 1, 10), to="fc")
    x = torch.randn(5, 1, 10)
    torch.testing.assert_close(converted(x.clone()), model(x.clone()))
