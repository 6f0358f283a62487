"""Loading every kind of SOURCE: state_dicts (+ --model), TorchScript, torch.export, pickles.

The oracle for specs and shapes is the eager model itself: its nn.Conv modules and what forward
hooks see when it runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from convtool.errors import ConvtoolError
from convtool.io.checkpoints import detect_format, import_model
from convtool.models import capture, trace_source
from convtool.source import ConvFlags, SourceOptions, load_source
from convtool.spec import ConvSpec, is_conv
from tests import models_for_tests as mt

MODEL = "tests.models_for_tests:make_mixed"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """--model is imported relative to the current folder, like uvicorn."""
    monkeypatch.chdir(REPO)


def hooked_shapes(model: nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Oracle: the one-sample input every nn.Conv module receives, seen by plain hooks."""
    seen: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, tuple(args[0].shape[1:]))

        return record

    handles = [
        m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules() if is_conv(m)
    ]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in handles:
        h.remove()
    return seen


def eager_specs(model: nn.Module) -> dict[str, ConvSpec]:
    return {n: ConvSpec.from_module(m) for n, m in model.named_modules() if is_conv(m)}


def opts(**kw: Any) -> SourceOptions:
    return SourceOptions(**kw)


# ---------------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
    ],
    ids=["plain", "state_dict", "model", "module-prefix"],
)
def test_state_dict_wrappers(tmp_path: Path, wrap: Any) -> None:
    model = mt.make_mixed()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(model.state_dict()), path)
    src = load_source(path, opts(model=MODEL))
    assert src.kind == "state_dict"
    assert {c.name: c.spec for c in src.layers} == eager_specs(model)
    for layer in src.layers:
        torch.testing.assert_close(layer.weight, model.get_submodule(layer.name).weight)
    x = torch.randn(mt.MIXED_INPUT)
    assert src.model is not None
    torch.testing.assert_close(src.model(x), model(x))


def test_safetensors_state_dict(tmp_path: Path) -> None:
    model = mt.make_mixed()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    src = load_source(path, opts(model=MODEL))
    x = torch.randn(mt.MIXED_INPUT)
    assert src.model is not None
    torch.testing.assert_close(src.model(x), model(x))


def test_float64_checkpoint_keeps_its_precision(tmp_path: Path) -> None:
    model = mt.make_mixed().double()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    src = load_source(tmp_path / "w.pt", opts(model=MODEL))
    assert all(c.weight.dtype == torch.float64 for c in src.layers)


def test_model_kwargs(tmp_path: Path) -> None:
    model = mt.make_mixed(width=9)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    src = load_source(tmp_path / "w.pt", opts(model=MODEL, model_kwargs='{"width": 9}'))
    assert src.layers[0].spec.out_channels == 9


def test_state_dict_mismatch_lists_keys_in_one_line(tmp_path: Path) -> None:
    sd = mt.make_mixed().state_dict()
    sd.pop("stem.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["seq.weight"] = torch.zeros(5, 4, 5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ConvtoolError) as err:
        load_source(tmp_path / "bad.pt", opts(model=MODEL))
    message = str(err.value)
    assert "\n" not in message
    assert "missing keys: stem.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "seq.weight (5, 4, 5) in the file vs (5, 4, 3) in the model" in message
    assert "bad.pt" in message


@pytest.mark.parametrize(
    ("target", "kwargs", "expect"),
    [
        ("tests.models_for_tests", None, "MODULE:CALLABLE"),
        ("no_such_module_xyz:make", None, "cannot import 'no_such_module_xyz'"),
        ("tests.models_for_tests:nope", None, "has no attribute 'nope'"),
        ("tests.models_for_tests:not_a_model", None, "not a torch.nn.Module"),
        ("tests.models_for_tests:make_mixed", "[1, 2]", "JSON object"),
        ("tests.models_for_tests:make_mixed", "{bad json", "JSON object"),
        ("tests.models_for_tests:make_mixed", '{"depth": 3}', "unexpected keyword"),
    ],
)
def test_bad_model_option(target: str, kwargs: str | None, expect: str) -> None:
    with pytest.raises(ConvtoolError, match=expect):
        import_model(target, kwargs)


def test_model_from_a_python_file() -> None:
    model = import_model("samples/digits_model.py:make_model", '{"width": 4}')
    assert model.conv1.out_channels == 4  # type: ignore[union-attr]


def test_state_dict_without_model_names_the_layers(tmp_path: Path) -> None:
    torch.save(mt.make_mixed().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConvtoolError, match="model='MODULE:CALLABLE'"):
        load_source(tmp_path / "w.pt", opts())
    # one entry of it is still a kernel source
    src = load_source(tmp_path / "w.pt", opts(layer="seq", flags=ConvFlags(padding=1)))
    assert src.kind == "kernel" and src.layers[0].spec.kind == "Conv1d"


def test_kernel_files_still_load(tmp_path: Path) -> None:
    w = np.ones((4, 2, 3, 3), dtype=np.float32)
    np.save(tmp_path / "k.npy", w)
    src = load_source(tmp_path / "k.npy", opts(flags=ConvFlags(stride=2)))
    assert src.kind == "kernel" and src.layers[0].spec.stride == (2, 2)


# ---------------------------------------------------------------------------------- TorchScript
@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = mt.make_mixed()
    path = tmp_path_factory.mktemp("ts") / "mixed.torchscript.pt"
    torch.jit.script(model).save(str(path))
    return path, model


def test_torchscript_archive(scripted: tuple[Path, nn.Module]) -> None:
    path, model = scripted
    assert detect_format(path) == "torchscript"
    src = load_source(path, opts())
    assert src.kind == "torchscript"
    assert {c.name: c.spec for c in src.layers} == eager_specs(model)
    for layer in src.layers:
        torch.testing.assert_close(layer.weight, model.get_submodule(layer.name).weight)
    # Script modules take no hooks; shapes are recorded at the dispatcher, reflect pads undone.
    trace_source(src, mt.MIXED_INPUT)
    assert {c.name: c.input_shape for c in src.layers} == hooked_shapes(model, mt.MIXED_INPUT)


def test_torchscript_lists_functional_convs_with_stored_weights(tmp_path: Path) -> None:
    model = mt.make_functional()
    torch.jit.script(model).save(str(tmp_path / "f.pt"))
    src = load_source(tmp_path / "f.pt", opts())
    assert [c.name for c in src.layers] == ["conv"]  # before running: the conv modules
    assert src.model is not None
    cap = capture(src.model, (1, 3, 8, 8))
    # the F.conv2d on the model's own parameter is a conv call too, named after its owner
    assert cap.input_shapes == {"conv": (3, 8, 8), "F.convolution#0": (4, 8, 8)}
    functional = cap.get("F.convolution#0")
    assert functional is not None and functional.spec.stride == (2, 2)
    assert cap.functional == []


def test_truncated_torchscript(scripted: tuple[Path, nn.Module], tmp_path: Path) -> None:
    data = scripted[0].read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvtoolError, match=r"cut\.pt"):
        load_source(bad, opts())


# ---------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = mt.make_mixed()
    path = tmp_path_factory.mktemp("ep") / "mixed.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(mt.MIXED_INPUT),)), str(path))
    return path, model


def test_export_program(exported: tuple[Path, nn.Module]) -> None:
    path, model = exported
    src = load_source(path, opts())
    assert src.kind == "export" and src.example_shape == mt.MIXED_INPUT
    # reflect/circular pads are folded back into their convs: the specs are the eager ones
    assert {c.name: c.spec for c in src.layers} == eager_specs(model)
    # shapes come from the graph's fake tensors, nothing run
    assert {c.name: c.input_shape for c in src.layers} == hooked_shapes(model, mt.MIXED_INPUT)
    x = torch.randn(mt.MIXED_INPUT)
    assert src.model is not None
    torch.testing.assert_close(src.model(x), model(x))


def test_export_with_functional_conv_and_transposed(tmp_path: Path) -> None:
    model = mt.make_functional()
    path = tmp_path / "f.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 8, 8),)), str(path))
    src = load_source(path, opts())
    # in a graph every conv call is a layer, the functional one too, named as in eager models
    assert [(c.name, c.input_shape) for c in src.layers] == [
        ("conv", (3, 8, 8)),
        ("F.conv2d#0", (4, 8, 8)),
    ]
    assert [c.name for c in src.layers] == [c.name for c in capture(model, (1, 3, 8, 8)).layers]
    assert src.layers[1].spec == ConvSpec.from_weight((2, 4, 3, 3), stride=2)
    model_t = mt.make_transposed()
    torch.export.save(
        torch.export.export(model_t, (torch.zeros(mt.TRANSPOSED_INPUT),)), str(tmp_path / "t.pt2")
    )
    src = load_source(tmp_path / "t.pt2", opts())
    assert {c.name: c.spec for c in src.layers} == eager_specs(model_t)


def test_truncated_export(exported: tuple[Path, nn.Module], tmp_path: Path) -> None:
    data = exported[0].read_bytes()
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(data[:-200])
    with pytest.raises(ConvtoolError, match=r"cut\.pt2.*torch\.export"):
        load_source(bad, opts())


# ---------------------------------------------------------------------------------- pickles
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 1, 3), "x": _Evil(marker)}, path)
    for options in (opts(), opts(model=MODEL)):
        with pytest.raises(ConvtoolError) as err:
            load_source(path, options)
        assert "allow_pickle=True" in str(err.value) and "evil.pt" in str(err.value)
        assert "system" in str(err.value)  # says what it wanted to import
    assert not marker.exists()


def test_pickled_module_needs_the_flag(tmp_path: Path) -> None:
    model = mt.make_mixed()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(ConvtoolError, match=r"'.*full\.pt'.*allow_pickle=True"):
        load_source(path, opts())
    src = load_source(path, opts(allow_pickle=True))
    assert src.kind == "pickle"
    assert {c.name: c.spec for c in src.layers} == eager_specs(model)


def test_truncated_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(mt.make_mixed().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ConvtoolError, match="truncated"):
        load_source(path, opts(model=MODEL))


def test_detect_format(tmp_path: Path, exported: tuple[Path, nn.Module]) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "a.pt")
    renamed = tmp_path / "program.bin"
    renamed.write_bytes(exported[0].read_bytes())
    assert detect_format(tmp_path / "a.pt") == "torch"
    assert detect_format(renamed) == "export"
    assert detect_format(Path("x.npz")) == "numpy"


def test_options_that_do_not_fit_the_source(
    tmp_path: Path, exported: tuple[Path, nn.Module]
) -> None:
    torch.save(mt.make_mixed().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConvtoolError, match="`model_kwargs` goes with model="):
        load_source(tmp_path / "w.pt", opts(model_kwargs="{}"))
    with pytest.raises(ConvtoolError, match=r"torch\.export program.*drop model="):
        load_source(exported[0], opts(model=MODEL))
    with pytest.raises(ConvtoolError, match=r"no conv layer named 'nope'.*stem"):
        load_source(exported[0], opts(layer="nope"))
