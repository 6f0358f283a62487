"""`convtool count-params` end to end: JSON, CSV, tables (golden files), exit codes.

Golden files live in tests/golden/; regenerate them with CONVTOOL_UPDATE_GOLDEN=1 after a
deliberate change of the table layout, and review the diff.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from convtool.cli import app
from convtool.params import count_params
from convtool.render.params import render_report

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.*

GOLDEN = Path(__file__).parent / "golden"
ENV = {"COLUMNS": "120", "NO_COLOR": "1", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}
runner = CliRunner(env=ENV)


def run(*args: object) -> Any:
    return runner.invoke(app, ["count-params", *(str(a) for a in args)])


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CONVTOOL_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with CONVTOOL_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    """The seed kernel: 2 output channels, 3 input channels, 3x3."""
    path = tmp_path / "seed.npy"
    np.save(path, np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32))
    return path


@pytest.fixture
def tkernel(tmp_path: Path) -> tuple[Path, Path]:
    """A ConvTranspose2d kernel (C_in=3, C_out=2) and its bias, float64."""
    rng = np.random.default_rng(1)
    w, b = tmp_path / "up.npy", tmp_path / "up_bias.npy"
    np.save(w, rng.standard_normal((3, 2, 3, 3)))
    np.save(b, rng.standard_normal(2))
    return w, b


def test_seed_json(seed: Path) -> None:
    r = run(seed, "--input-shape", "3,24,24", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    (layer,) = data["layers"]
    assert layer["lc_params"] == 26136
    assert layer["conv_params"] == 54
    assert layer["fc_params"] == 968 * 1728
    assert layer["fc_nonzero"] == 26136
    assert layer["name"] == "seed" and layer["type"] == "Conv2d"
    assert layer["input_shape"] == [3, 24, 24] and layer["output_shape"] == [2, 22, 22]
    total = data["total"]
    assert total["original_params"] == 54 and total["lc_params"] == 26136
    assert total["fc_params"] == 968 * 1728 and total["fc_nonzero"] == 26136
    assert r.stderr == ""


def test_batched_input_shape_is_accepted(seed: Path) -> None:
    r = run(seed, "-i", "1,3,24,24", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["layers"][0]["input_shape"] == [3, 24, 24]


def test_flags_change_the_counts(seed: Path) -> None:
    r = run(seed, "-i", "3,24,24", "--padding", "1", "--stride", "2", "--json")
    assert r.exit_code == 0, r.stderr
    layer = json.loads(r.stdout)["layers"][0]
    conv = nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False)
    out = conv(torch.zeros(1, 3, 24, 24))
    assert layer["output_shape"] == list(out.shape[1:])
    assert layer["lc_params"] == out[0, 0].numel() * 54
    assert layer["fc_nonzero"] < layer["lc_params"]  # taps on the padding are not entries


def test_csv(seed: Path) -> None:
    r = run(seed, "-i", "3,24,24", "--csv")
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["name"] for row in rows] == ["seed", "TOTAL"]
    assert rows[0]["lc_params"] == "26136" and rows[0]["input_shape"] == "3x24x24"
    assert rows[0]["fc_params"] == str(968 * 1728)
    assert rows[1]["type"] == "model" and rows[1]["conv_params"] == "54"


def test_missing_input_shape_reports_conv_only(seed: Path) -> None:
    r = run(seed, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    layer = data["layers"][0]
    assert layer["conv_params"] == 54
    for key in ("input_shape", "output_shape", "lc_params", "fc_params", "fc_nonzero"):
        assert layer[key] is None
    assert "--input-shape" in layer["notes"][0]
    assert data["total"]["original_params"] == 54 and data["total"]["lc_params"] is None


def test_transposed_has_no_lc(tkernel: tuple[Path, Path]) -> None:
    w, b = tkernel
    r = run(w, "--transposed", "--bias", b, "-i", "3,5,5", "--stride", "2", "--json")
    assert r.exit_code == 0, r.stderr
    layer = json.loads(r.stdout)["layers"][0]
    conv = nn.ConvTranspose2d(3, 2, 3, stride=2)
    assert layer["type"] == "ConvTranspose2d"
    assert layer["lc_params"] is None and any("transposed" in n for n in layer["notes"])
    assert layer["conv_params"] == sum(p.numel() for p in conv.parameters())
    out = conv(torch.zeros(1, 3, 5, 5))[0]
    assert layer["fc_params"] == out.numel() * 75 + out.numel()
    assert layer["dtype"] == "float64"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "4,24,24"], "input channels"),
        (["-i", "3,x,24"], "--input-shape"),
        (["-i", "3,24,24", "--json", "--csv"], "--json and --csv"),
        (["-i", "3,24,24", "--layers", "conv9"], "matches no conv layer"),
        (["-i", "3,24,24", "--groups", "4"], "divisible by groups"),
    ],
)
def test_bad_input_exits_2_with_one_line(seed: Path, args: list[str], message: str) -> None:
    r = run(seed, *args)
    assert r.exit_code == 2
    assert r.stdout == ""
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    r = run(tmp_path / "nope.npy", "-i", "3,8,8")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_help_lists_the_options() -> None:
    r = runner.invoke(app, ["count-params", "--help"])
    assert r.exit_code == 0
    for option in ("--input-shape", "--layers", "--json", "--csv", "--model", "--allow-pickle"):
        assert option in r.stdout


# ---------------------------------------------------------------------------- golden tables
def test_golden_seed_table(seed: Path) -> None:
    r = run(seed, "--input-shape", "3,24,24")
    assert r.exit_code == 0, r.stderr
    check_golden("count_params_seed.txt", r.stdout)


def test_golden_transposed_table(tkernel: tuple[Path, Path]) -> None:
    w, b = tkernel
    r = run(w, "--transposed", "--bias", b, "-i", "3,5,5", "--stride", "2", "--padding", "1")
    assert r.exit_code == 0, r.stderr
    check_golden("count_params_transposed.txt", r.stdout)


def test_golden_missing_shape_table(seed: Path) -> None:
    r = run(seed)
    assert r.exit_code == 0, r.stderr
    assert " - " in r.stdout
    check_golden("count_params_no_shape.txt", r.stdout)


class TiedNet(nn.Module):
    """A small model with a tied conv weight, a transposed conv and non-conv parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        )
        self.body[2].weight = self.body[0].weight
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.bn(self.stem(x)))
        return self.head(self.up(x).flatten(1))


def test_golden_model_table() -> None:
    report = count_params(TiedNet(), (1, 3, 32, 32))
    buf = io.StringIO()
    render_report(report, Console(file=buf, width=120, color_system=None, force_terminal=False))
    check_golden("count_params_model.txt", buf.getvalue())


# ---------------------------------------------------------------------------- model sources
MODEL = f"{__name__}:TiedNet"


def _hook_shapes(model: nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Oracle: the one-sample input shape each conv sees, recorded by plain forward pre-hooks."""
    seen: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(name, tuple(args[0].shape[1:]))

        return record

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            m.register_forward_pre_hook(hook(name))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape))
    return seen


def _stored(module: nn.Module) -> int:
    # a sparse T is state, not a buffer (FullyConnected keeps it out of torch.export's reach)
    sparse = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(p.numel() for p in module.parameters()) + sum(
        t.values().numel() for t in sparse.values() if t.layout == torch.sparse_csr
    )


@pytest.fixture
def state_dict(tmp_path: Path) -> Path:
    path = tmp_path / "tied.pt"
    torch.manual_seed(0)
    torch.save(TiedNet().state_dict(), path)
    return path


def test_state_dict_model(state_dict: Path) -> None:
    from convtool.models import convert_model

    r = run(state_dict, "--model", MODEL, "-i", "1,3,32,32", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    net = TiedNet()
    shapes = _hook_shapes(net, (1, 3, 32, 32))
    assert {layer["name"]: tuple(layer["input_shape"]) for layer in data["layers"]} == shapes
    total = data["total"]
    assert total["original_params"] == sum(p.numel() for p in net.parameters())
    assert data["example_input_shape"] == [1, 3, 32, 32]
    fc = convert_model(net, (1, 3, 32, 32), to="fc", sparse=True)
    assert total["fc_nonzero"] == _stored(fc)
    up = next(layer for layer in data["layers"] if layer["name"] == "up")
    assert up["lc_params"] is None

    # --layers: convert only the forward convs; the transposed one stays.
    r = run(state_dict, "--model", MODEL, "-i", "1,3,32,32", "--layers", "stem,body.*", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [layer["name"] for layer in data["layers"]] == ["stem", "body.0", "body.2"]
    lc = convert_model(net, (1, 3, 32, 32), to="lc", layers="stem,body.*")
    assert data["total"]["lc_params"] == _stored(lc)


def test_state_dict_without_input_shape(state_dict: Path) -> None:
    r = run(state_dict, "--model", MODEL, "--csv")
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["name"] for row in rows] == ["stem", "body.0", "body.2", "up", "TOTAL"]
    assert rows[0]["conv_params"] == str(3 * 8 * 9 + 8) and rows[0]["lc_params"] == ""
    assert rows[-1]["conv_params"] == str(sum(p.numel() for p in TiedNet().parameters()))
    assert "--input-shape" in rows[0]["notes"]


def test_single_layer_of_a_model(state_dict: Path) -> None:
    r = run(state_dict, "--model", MODEL, "-i", "1,3,32,32", "--layer", "body.0", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [layer["name"] for layer in data["layers"]] == ["body.0"]
    assert data["layers"][0]["lc_params"] == 16 * 16 * (8 * 8 * 9 + 8)


def test_model_that_fails_to_run_exits_2(state_dict: Path) -> None:
    r = run(state_dict, "--model", MODEL, "-i", "1,3,30,30")
    assert r.exit_code == 2 and "failed" in r.stderr and r.stdout == ""


class ScriptNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, stride=2, bias=False)
        self.head = nn.Linear(2 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))).flatten(1))


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "net.ts"
    torch.jit.script(ScriptNet()).save(str(path))
    return path


def test_torchscript_is_listed_without_running(script: Path) -> None:
    r = run(script, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [(x["name"], x["conv_params"]) for x in data["layers"]] == [("a", 40), ("b", 72)]
    assert all(x["lc_params"] is None for x in data["layers"])
    assert data["total"]["original_params"] == sum(p.numel() for p in ScriptNet().parameters())


def test_torchscript_traced(script: Path) -> None:
    r = run(script, "-i", "1,1,8,8", "--json")
    assert r.exit_code == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    assert [x["input_shape"] for x in layers] == [[1, 8, 8], [4, 8, 8]]
    assert layers[1]["lc_params"] == 3 * 3 * 72


def test_torchscript_that_cannot_run_is_still_listed(script: Path) -> None:
    r = run(script, "-i", "1,1,9,9", "--json")
    assert r.exit_code == 0, r.stderr
    assert "warning" in r.stderr
    layers = json.loads(r.stdout)["layers"]
    assert [x["conv_params"] for x in layers] == [40, 72]
    assert all(x["fc_params"] is None and x["notes"] for x in layers)


def test_export_program_knows_its_shapes(tmp_path: Path) -> None:
    path = tmp_path / "net.pt2"
    net = ScriptNet().eval()
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 8, 8),)), path)
    r = run(path, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["example_input_shape"] == [1, 1, 8, 8]
    assert [x["input_shape"] for x in data["layers"]] == [[1, 8, 8], [4, 8, 8]]
    assert data["total"]["original_params"] == sum(p.numel() for p in net.parameters())
