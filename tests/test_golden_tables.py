"""Golden tables of the five commands at 80 and 120 columns (tests/golden/<name>_<width>.txt).

Every table must fit its width: columns drop in each renderer's documented order and layer names
wrap only after a '.', so no name component and no number-with-unit is ever cut. Output is
deterministic: relative paths, no random weights (integer weights, `verify --trials 0`, so every
error is exactly 0) and timings pinned to 0. Regenerate with CONVTOOL_UPDATE_GOLDEN=1 after a
deliberate layout change, and review the diff.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from convtool.cli import app
from tests.golden_models import INPUT, make_long_names

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GOLDEN = Path(__file__).parent / "golden"
MODEL = f"{Path(__file__).parent / 'golden_models.py'}:make_long_names"
SHAPE = ",".join(map(str, INPUT))
NAMES = [
    "encoder.stage_one.depthwise_separable_block",
    "encoder.stage_one.pointwise_projection",
    "decoder.upsample_transposed",
    "head",
]
WIDTHS = (80, 120)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the model's state_dict and an integer kernel, as relative paths."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "perf_counter", lambda: 0.0)  # timings print as 0.00 s
    torch.save(make_long_names().state_dict(), "net.pt")
    np.save("kernel.npy", (np.arange(4 * 3 * 3 * 3) % 3 - 1).reshape(4, 3, 3, 3).astype("f8"))
    return tmp_path


def run(width: int, *args: str) -> str:
    env = {"COLUMNS": str(width), "NO_COLOR": "1", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}
    result = CliRunner(env=env).invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    return result.stdout


def check(name: str, width: int, text: str) -> None:
    path = GOLDEN / f"{name}_{width}.txt"
    if os.environ.get("CONVTOOL_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with CONVTOOL_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def assert_fits(text: str, width: int, names: list[str]) -> None:
    """Table lines fit; names appear whole or broken only after a '.'; units stay attached."""
    free_text = ("  ", "PASSED", "FAILED")  # notes and the verdict are unwrapped free text
    table_lines = [ln for ln in text.splitlines() if not ln.startswith(free_text)]
    too_wide = [ln for ln in table_lines if len(ln.rstrip()) > width]
    assert not too_wide, too_wide
    for name in names:
        for part in name.split("."):
            assert re.search(rf"(?<![\w]){re.escape(part)}(?![\w])", text), (name, part)
    assert not re.search(r"\d\s*$\n\s*(B|KiB|MiB|GiB|K|M|G)\b", text, re.M)
    assert "…" not in text


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect(workdir: Path, width: int) -> None:
    text = run(width, "inspect", "net.pt", "--model", MODEL, "-i", SHAPE)
    assert_fits(text, width, NAMES)
    check("inspect_model", width, text)


@pytest.mark.parametrize("width", WIDTHS)
def test_count_params(workdir: Path, width: int) -> None:
    text = run(width, "count-params", "net.pt", "--model", MODEL, "-i", SHAPE)
    assert_fits(text, width, NAMES)
    check("count_params_long_names", width, text)


@pytest.mark.parametrize("width", WIDTHS)
def test_verify(workdir: Path, width: int) -> None:
    text = run(width, "verify", "net.pt", "--model", MODEL, "-i", SHAPE, "--trials", "0")
    assert_fits(text, width, NAMES)
    assert "PASSED" in text
    check("verify_model", width, text)


@pytest.mark.parametrize("width", WIDTHS)
def test_convert(workdir: Path, width: int) -> None:
    args = ["convert", "net.pt", "--model", MODEL, "-i", SHAPE, "--to", "fc", "--sparse"]
    text = run(width, *args, "-o", f"net_fc_{width}.safetensors")
    assert_fits(text, width, NAMES)
    check("convert_model", width, text)


@pytest.mark.parametrize("width", WIDTHS)
def test_toeplitz(workdir: Path, width: int) -> None:
    args = ["toeplitz", "kernel.npy", "-i", "3,5,6", "--stride", "2", "--padding", "1"]
    text = run(width, *args, "-o", "T.npz", "--sparse")
    assert_fits(text, width, ["kernel"])
    check("toeplitz_kernel", width, text)
