"""`convtool spectrum` and `convtool toeplitz --plot` end to end: JSON, tables (golden files at
80 and 120 columns), PNGs, exit codes. Regenerate golden files with CONVTOOL_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from convtool.cli import app
from convtool.operators import SpectrumReport, layer_spectrum
from convtool.render.spectrum import render_spectrum
from convtool.spec import ConvSpec

GOLDEN = Path(__file__).parent / "golden"
ENV = {"COLUMNS": "80", "NO_COLOR": "1", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}
runner = CliRunner(env=ENV)
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CONVTOOL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with CONVTOOL_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "k.npy"
    np.save(path, np.random.default_rng(0).standard_normal((4, 3, 3, 3)))
    return path


def test_json_fields_match_svdvals(kernel: Path) -> None:
    r = run("spectrum", kernel, "-i", "3,6,7", "--padding", "1", "--k", "3", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    (layer,) = data["layers"]
    w = torch.from_numpy(np.load(kernel))
    eye = torch.eye(126, dtype=torch.float64).view(126, 3, 6, 7)
    t = torch.nn.functional.conv2d(eye, w, padding=1).reshape(126, -1).T
    ref = torch.linalg.svdvals(t).numpy()
    assert layer["name"] == "k" and layer["method"] == "dense"
    np.testing.assert_allclose(layer["values"], ref[:3], rtol=1e-12)
    assert layer["sigma_max"] == pytest.approx(ref[0], rel=1e-12)
    assert data["lipschitz_bound"] >= ref[0]
    assert data["lipschitz_bound"] == pytest.approx(ref[0], rel=1e-9)


def test_smallest_and_condition(kernel: Path) -> None:
    r = run("spectrum", kernel, "-i", "3,6,7", "--padding", "1", "--smallest", "--json")
    assert r.exit_code == 0, r.stderr
    layer = json.loads(r.stdout)["layers"][0]
    assert layer["condition"] == pytest.approx(layer["sigma_max"] / layer["sigma_min"])
    assert layer["smallest_values"][-1] == layer["sigma_min"]


def test_table_fits_80_columns(kernel: Path) -> None:
    r = run("spectrum", kernel, "-i", "3,6,7", "--padding", "1", "--smallest")
    assert r.exit_code == 0, r.stderr
    assert "sigma_max" in r.stdout and "dense" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 2, 2, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _report() -> SpectrumReport:
    model = Chain().double()
    shapes = [(2, 8, 8), (4, 8, 8), (4, 4, 4)]
    layers = []
    for (name, module), shape in zip(
        [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)],
        shapes,
        strict=True,
    ):
        result = layer_spectrum(
            name, ConvSpec.from_module(module), module.weight, shape, 3, smallest=True
        )
        # times vary between runs: pin them for the golden files
        layers.append(
            dataclasses.replace(
                result,
                largest=dataclasses.replace(result.largest, seconds=0.0),
                smallest=dataclasses.replace(result.smallest, seconds=0.0),  # type: ignore[arg-type]
            )
        )
    return SpectrumReport(layers)


@pytest.mark.parametrize("width", [80, 120])
def test_golden_tables(width: int) -> None:
    buf = io.StringIO()
    render_spectrum(
        _report(), True, Console(file=buf, width=width, color_system=None, force_terminal=False)
    )
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    check_golden(f"spectrum_{width}.txt", text)


def test_model_lipschitz_bound_is_the_product() -> None:
    report = _report()
    model = Chain().double()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    bound = report.lipschitz_bound
    assert bound is not None
    tops = [layer.sigma_max for layer in report.layers]
    assert bound == pytest.approx(float(np.prod(tops)), rel=1e-9)
    # the chain without biases is a bound's worth of Lipschitz: check on random pairs
    for m in model.modules():
        if hasattr(m, "bias") and m.bias is not None:
            m.bias.data.zero_()
    with torch.no_grad():
        for _ in range(5):
            d = torch.randn_like(x)
            ratio = (model(x + d) - model(x)).norm() / d.norm()
            assert float(ratio) <= bound


def test_model_source_with_layers_glob(tmp_path: Path) -> None:
    sd = tmp_path / "chain.pt"
    torch.save(Chain().state_dict(), sd)
    r = run(
        "spectrum", sd, "--model", f"{__name__}:Chain", "-i", "1,2,8,8",
        "--layers", "features.0,features.2", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [layer["name"] for layer in data["layers"]] == ["features.0", "features.2"]
    assert data["layers"][0]["method"] == "fft"
    tops = [layer["sigma_max"] for layer in data["layers"]]
    assert data["lipschitz_bound"] >= tops[0] * tops[1]


def test_plot_writes_png_and_refuses_to_overwrite(kernel: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.png"
    r = run("spectrum", kernel, "-i", "3,6,7", "--padding", "1", "--plot", out)
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes()[:8] == PNG
    r = run("spectrum", kernel, "-i", "3,6,7", "--padding", "1", "--plot", out)
    assert r.exit_code == 2 and "already exists" in r.stderr


@pytest.mark.parametrize("shape", ["3,7,9", "3,40,40"])  # entries, then a density image
def test_toeplitz_plot(kernel: Path, tmp_path: Path, shape: str) -> None:
    out = tmp_path / "T.png"
    r = run("toeplitz", kernel, "-i", shape, "--padding", "1", "--padding-mode", "reflect",
            "--plot", out, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes()[:8] == PNG
    assert json.loads(r.stdout)["plot"] == ("entries" if shape == "3,7,9" else "density")


def test_missing_matplotlib_is_one_line(
    kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    for cmd in ("spectrum", "toeplitz"):
        r = run(cmd, kernel, "-i", "3,6,7", "--plot", tmp_path / "x.png")
        assert r.exit_code == 2
        assert r.stderr.strip().count("\n") == 0
        assert "torch-convtool[plot]" in r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "--k must be a positive"),
        (["--method", "magic"], "--method must be one of"),
        (["--method", "fft"], "method='fft' needs circular"),
        (["--method", "bound", "--smallest"], "drop --smallest"),
        (["--tol", "2"], "--tol must be in"),
    ],
)
def test_bad_options(kernel: Path, args: list[str], message: str) -> None:
    r = run("spectrum", kernel, "-i", "3,6,7", *args)
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_conv_called_on_two_shapes_is_analysed_at_each(tmp_path: Path) -> None:
    # The shared shape logic (describe.layers_with_shapes): one entry per input shape, each
    # against torch's own conv on the identity basis.
    from tests.models_for_tests import make_shared

    model = make_shared()
    sd = tmp_path / "shared.pt"
    torch.save(model.state_dict(), sd)
    r = run(
        "spectrum", sd, "--model", "tests.models_for_tests:make_shared", "-i", "1,2,8,8", "--json"
    )
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    got = sorted((layer["name"], layer["sigma_max"]) for layer in data["layers"])
    assert [name for name, _ in got] == ["conv", "conv", "other"]
    assert any("2 input shapes" in note and "each is analysed" in note for note in data["notes"])
    want = []
    for name, conv, side in (
        ("conv", model.conv, 8),
        ("conv", model.conv, 4),
        ("other", model.other, 8),
    ):
        n = 2 * side * side
        eye = torch.eye(n, dtype=torch.float64).view(n, 2, side, side)
        w = conv.weight.detach().double()
        t = torch.nn.functional.conv2d(eye, w, padding=conv.padding).reshape(n, -1).T
        want.append((name, float(torch.linalg.svdvals(t)[0])))
    for (name, sigma), (name_w, sigma_w) in zip(got, sorted(want), strict=True):
        assert name == name_w and sigma == pytest.approx(sigma_w, rel=1e-9)
