"""`convtool inspect` and `convtool convert` end to end, through the CLI (CliRunner).

Exit codes and stdout/stderr are asserted separately; converted files are loaded back with
torch alone (or `convtool.load_converted`) and compared with the original model's output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from convtool.cli import app
from convtool.converted import load_converted
from tests import models_for_tests as mt

REPO = Path(__file__).resolve().parent.parent
MODEL = "tests.models_for_tests:make_mixed"
SHAPE = ",".join(map(str, mt.MIXED_INPUT))
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # --model MODULE:CALLABLE is imported from the current folder


def run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    model = mt.make_mixed()
    paths = {
        "state_dict": folder / "mixed.pt",
        "torchscript": folder / "mixed.torchscript.pt",
        "export": folder / "mixed.pt2",
    }
    torch.save(model.state_dict(), paths["state_dict"])
    torch.jit.script(model).save(str(paths["torchscript"]))
    program = torch.export.export(model, (torch.zeros(mt.MIXED_INPUT),))
    torch.export.save(program, str(paths["export"]))
    return paths


def expected_shapes() -> dict[str, tuple[list[int], list[int]]]:
    """Oracle: (input, output) of every conv, as hooks on the eager model see them."""
    model = mt.make_mixed()
    seen: dict[str, tuple[list[int], list[int]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d):
            m.register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(
                    name, (list(args[0].shape[1:]), list(out.shape[1:]))
                )
            )
    model(torch.zeros(mt.MIXED_INPUT))
    return seen


# ---------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "export"])
def test_inspect_json_shapes(files: dict[str, Path], kind: str) -> None:
    extra = ["--model", MODEL] if kind == "state_dict" else []
    shape = [] if kind == "export" else ["--input-shape", SHAPE]  # a program knows its shapes
    r = run("inspect", files[kind], *extra, *shape, "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["kind"] == kind
    got = {c["name"]: (c["input_shape"], c["output_shape"]) for c in result["layers"]}
    assert got == expected_shapes()
    stem = result["layers"][0]
    assert (stem["kind"], stem["stride"], stem["padding_mode"]) == ("Conv2d", [2, 1], "reflect")
    assert result["layers"][1]["groups"] == 3 and result["layers"][1]["dilation"] == [2, 2]


def test_inspect_table(files: dict[str, Path]) -> None:
    r = run("inspect", files["state_dict"], "--model", MODEL, "-i", SHAPE)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    for text in ("stem", "features.0", "seq", "Conv1d", "reflect", "circular", "(3,12,12)"):
        assert text in r.stdout


def test_inspect_reports_functional_convs(tmp_path: Path) -> None:
    torch.save(mt.make_functional().state_dict(), tmp_path / "f.pt")
    r = run(
        "inspect",
        tmp_path / "f.pt",
        "--model",
        "tests.models_for_tests:make_functional",
        "-i",
        "1,3,8,8",
    )
    assert r.exit_code == 0, r.stderr
    # F.conv2d on a parameter is a conv layer, named after its module and call
    assert "F.conv2d#0" in r.stdout


def test_inspect_bad_inputs(files: dict[str, Path], tmp_path: Path) -> None:
    r = run("inspect", files["state_dict"])
    assert r.exit_code == 2 and r.stdout == ""
    assert "--model MODULE:CALLABLE" in r.stderr
    r = run("inspect", files["state_dict"], "--model", MODEL, "-i", "1,5,9")
    assert r.exit_code == 2 and r.stdout == ""
    assert "running the model on an input of shape (1, 5, 9) failed" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("inspect", tmp_path / "missing.pt")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_malicious_pickle_via_cli(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    r = run("inspect", tmp_path / "evil.pt")
    assert r.exit_code == 2 and r.stdout == ""
    assert "--allow-pickle" in r.stderr and "evil.pt" in r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists()


def test_state_dict_mismatch_via_cli(tmp_path: Path) -> None:
    torch.save(mt.make_volume().state_dict(), tmp_path / "w.pt")
    r = run("inspect", tmp_path / "w.pt", "--model", MODEL)
    assert r.exit_code == 2 and r.stdout == ""
    assert "missing keys: stem.weight" in r.stderr and "unexpected keys: a.weight" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------- convert
def test_convert_to_pt2(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mixed_lc.pt2"
    r = run("convert", files["state_dict"], "--model", MODEL, "-i", SHAPE, "--to", "lc", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "stem" in r.stdout and "LocallyConnected1d" in r.stdout
    x = torch.randn(mt.MIXED_INPUT)
    module = torch.export.load(str(out)).module()
    torch.testing.assert_close(module(x), mt.make_mixed()(x))


@pytest.mark.parametrize(("kind", "to"), [("torchscript", "fc"), ("export", "lc")])
def test_convert_archives(files: dict[str, Path], tmp_path: Path, kind: str, to: str) -> None:
    out = tmp_path / "c.pt2"
    shape = ["-i", SHAPE] if kind == "torchscript" else []
    form = ["--to", to, "--sparse"] if to == "fc" else ["--to", to]
    r = run("convert", files[kind], *shape, *form, "-o", out, "--json")
    if kind == "torchscript":  # refused before any work, saying what works
        assert r.exit_code == 2 and r.stdout == ""
        assert "TorchScript" in r.stderr and ".pt2" in r.stderr and "--model" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
        return
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert [c["name"] for c in result["layers"]] == ["stem", "features.0", "features.3", "seq"]
    x = torch.randn(mt.MIXED_INPUT)
    torch.testing.assert_close(torch.export.load(str(out)).module()(x), mt.make_mixed()(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_state_dict_output(files: dict[str, Path], tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"mixed_fc{suffix}"
    r = run(
        "convert",
        files["state_dict"],
        "--model",
        MODEL,
        "-i",
        SHAPE,
        "--to",
        "fc",
        "--sparse",
        "--layers",
        "features.*,seq",
        "-o",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert [c["name"] for c in result["layers"]] == ["features.0", "features.3", "seq"]
    assert result["bytes_written"] == out.stat().st_size
    rebuilt = load_converted(mt.make_mixed(), out).eval()
    assert set(rebuilt.input_shapes) == {"features.0", "features.3", "seq"}
    x = torch.randn(mt.MIXED_INPUT)
    torch.testing.assert_close(rebuilt(x), mt.make_mixed()(x))


def test_convert_converts_functional_convs(tmp_path: Path) -> None:
    torch.save(mt.make_functional().state_dict(), tmp_path / "f.pt")
    r = run(
        "convert",
        tmp_path / "f.pt",
        "--model",
        "tests.models_for_tests:make_functional",
        "-i",
        "1,3,8,8",
        "--to",
        "lc",
        "-o",
        tmp_path / "f.pt2",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    assert [c["name"] for c in json.loads(r.stdout)["layers"]] == ["conv", "F.conv2d#0"]
    assert json.loads(r.stdout)["functional"] == []


def test_convert_no_clobber_and_force(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "keep.pt"
    out.write_bytes(b"precious")
    args = ["convert", files["state_dict"], "--model", MODEL, "-i", SHAPE, "--to", "lc", "-o", out]
    r = run(*args)
    assert r.exit_code == 2 and r.stdout == ""
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = run(*args, "--force")
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() != b"precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keep")]  # no temp left


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--to", "toeplitz", "-o", "x.pt2"], "Invalid value for '--to'"),
        (["--to", "lc", "--sparse", "-o", "x.pt2"], "--sparse applies to --to fc"),
        (["--to", "lc", "-o", "x.txt"], "cannot tell the output format"),
        (["--to", "fc", "-o", "x.pt2", "--max-memory", "1K"], "use --sparse or --to lc"),
        (["--to", "lc", "-o", "x.pt2", "--layers", "nope*"], "'nope*' matches no conv layer"),
        (["-o", "x.pt2"], "Missing option '--to'"),
    ],
)
def test_convert_bad_input(
    files: dict[str, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    extra = [str(tmp_path / e) if e.startswith("x.") else e for e in extra]
    r = run("convert", files["state_dict"], "--model", MODEL, "-i", SHAPE, *extra)
    assert r.exit_code == 2, r.stdout
    assert r.stdout == ""
    assert message in r.stderr
    assert not list(tmp_path.iterdir())


def test_convert_needs_an_input_shape(files: dict[str, Path], tmp_path: Path) -> None:
    r = run(
        "convert", files["state_dict"], "--model", MODEL, "--to", "lc", "-o", tmp_path / "x.pt2"
    )
    assert r.exit_code == 2 and "--input-shape is required" in r.stderr


def test_toeplitz_on_a_model_layer(files: dict[str, Path]) -> None:
    """The toeplitz command takes model sources too: the layer's shape comes from tracing."""
    r = run(
        "toeplitz", files["state_dict"], "--model", MODEL, "-i", SHAPE, "--layer", "seq", "--json"
    )
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    seq_in, seq_out = expected_shapes()["seq"]
    assert result["input_shape"] == seq_in and result["output_shape"] == seq_out


def test_kernel_file_converts_and_inspects(tmp_path: Path) -> None:
    """A raw kernel with flags is a one-conv model; the oracle is F.conv2d."""
    w = torch.randn(4, 2, 3, 2)
    np.save(tmp_path / "k.npy", w.numpy())
    flags = ["--stride", "2,1", "--padding", "1", "--padding-mode", "circular", "--groups", "1"]
    r = run("inspect", tmp_path / "k.npy", *flags, "-i", "2,7,5", "--json")
    assert r.exit_code == 0, r.stderr
    layer = json.loads(r.stdout)["layers"][0]
    x = torch.randn(3, 2, 7, 5)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w, stride=(2, 1))
    assert layer["output_shape"] == list(y.shape[1:]) and layer["padding_mode"] == "circular"
    out = tmp_path / "k_fc.pt2"
    r = run("convert", tmp_path / "k.npy", *flags, "-i", "2,7,5", "--to", "fc", "-o", out)
    assert r.exit_code == 0, r.stderr
    torch.testing.assert_close(torch.export.load(str(out)).module()(x), y)


def test_convert_refuses_nonfinite_weights(tmp_path: Path) -> None:
    sd = mt.make_mixed().state_dict()
    sd["seq.weight"][0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    args = ["convert", tmp_path / "nan.pt", "--model", MODEL, "-i", SHAPE, "--to", "lc"]
    r = run(*args, "-o", tmp_path / "x.pt2")
    assert (
        r.exit_code == 2 and "'seq' has 1 NaN/inf" in r.stderr and "--allow-nonfinite" in r.stderr
    )
    assert not (tmp_path / "x.pt2").exists()
