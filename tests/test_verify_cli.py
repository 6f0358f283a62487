"""`convtool verify` end to end: exit codes, stdout/stderr, JSON, model sources."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from convtool.cli import app
from tests.verify_models import make_model

runner = CliRunner()
FLAGS = ["--stride", "2,1", "--padding", "1", "--dilation", "1,2", "--groups", "2",
         "--padding-mode", "reflect"]  # fmt: skip


def run(*args: object) -> Any:
    return runner.invoke(app, ["verify", *(str(a) for a in args)])


def as_json(result: Any) -> dict[str, Any]:
    assert result.stderr == "", result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "w.npy", torch.randn(6, 2, 3, 2, generator=g).numpy())
    np.save(tmp_path / "b.npy", torch.randn(6, generator=g).numpy())
    return tmp_path / "w.npy"


def test_kernel_passes_with_table_and_exit_0(kernel: Path) -> None:
    r = run(kernel, "--input-shape", "4,7,6", "--bias", kernel.with_name("b.npy"), *FLAGS)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    for form in ("toeplitz_dense", "toeplitz_sparse", "lc", "fc_dense", "fc_sparse"):
        assert form in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("PASSED: 5 of 5 comparisons"), last


def test_json_contract_float32(kernel: Path) -> None:
    r = run(kernel, "-i", "1,4,7,6", *FLAGS, "--json", "--dtype", "float32", "--trials", "2")
    assert r.exit_code == 0
    data = as_json(r)
    assert data["passed"] is True and data["dtype"] == "float32"
    assert data["tolerance"] == {
        "rtol": 1.3e-6, "atol": 1e-5, "source": "torch.testing defaults for float32",
    }  # fmt: skip
    assert data["inputs"] == ["random 0", "random 1", "ones", "zeros"]
    assert data["end_to_end"] is None
    assert len(data["layers"]) == 5
    for entry in data["layers"]:
        assert entry["name"] == "w" and entry["passed"] is True
        assert 0 <= entry["max_abs_error"] < 1e-5
        assert entry["max_rel_error"] >= 0 and entry["tightest_atol_at_rtol_0"] is not None


def test_user_tolerance_and_float64_rounding_level(kernel: Path) -> None:
    r = run(kernel, "-i", "4,7,6", *FLAGS, "--json", "--rtol", "0", "--atol", "1e-12")
    data = as_json(r)
    assert r.exit_code == 0 and data["tolerance"]["source"] == "user"
    assert all(e["max_abs_error"] <= 1e-12 for e in data["layers"])


def test_impossible_tolerance_is_a_mismatch_exit_1(kernel: Path) -> None:
    # float32 arithmetic cannot match at zero tolerance: the report says FAILED, exit 1
    r = run(kernel, "-i", "4,7,6", *FLAGS, "--dtype", "float32", "--rtol", "0", "--atol", "0")
    assert r.exit_code == 1
    assert r.stdout.strip().splitlines()[-1].startswith("FAILED")


def test_nan_weight_exit_1_not_refused(tmp_path: Path) -> None:
    w = torch.randn(3, 2, 3)
    w[1, 0, 2] = math.nan
    np.save(tmp_path / "nan.npy", w.numpy())
    r = run(tmp_path / "nan.npy", "-i", "2,9", "--json")
    assert r.exit_code == 1
    data = as_json(r)
    assert data["passed"] is False
    assert {e["passed"] for e in data["layers"]} == {False}
    assert all(e["nonfinite"] > 0 and e["max_abs_error"] is None for e in data["layers"])
    table = run(tmp_path / "nan.npy", "-i", "2,9", "--to", "toeplitz")
    assert table.exit_code == 1 and "NaN/inf" in table.stdout
    assert "FAILED: 2 of 2" in table.stdout


def test_transposed_lc_is_not_applicable(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", torch.randn(4, 3, 3, 2).numpy())
    r = run(tmp_path / "t.npy", "-i", "4,5,4", "--transposed", "--stride", "2",
            "--groups", "2", "--output-padding", "1", "--json")  # fmt: skip
    assert r.exit_code == 0
    lc = next(e for e in as_json(r)["layers"] if e["form"] == "lc")
    assert lc["status"] == "not applicable" and lc["passed"] is None


def test_small_max_memory_samples_rows(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", torch.randn(32, 2, 3, 3).numpy())
    r = run(tmp_path / "w.npy", "-i", "4,9,10", "--groups", "2", "--padding", "2", "--stride", "2",
            "--to", "toeplitz", "--max-memory", "400K")  # fmt: skip
    assert r.exit_code == 0, r.stdout
    assert "toeplitz_sampled" in r.stdout and "skipped" in r.stdout
    assert "output channels" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rtol", "1e-3"], "--rtol was given without --atol"),
        (["--to", "conv"], "Invalid value for '--to'"),
        (["--dtype", "int8"], "dtype must be float32 or float64"),
        (["--trials", "-1"], "must be non-negative"),
        (["--layers", "nope*"], "matches no conv layer"),
        (["--layer", "w", "--layers", "w"], "both given"),
        (["--max-memory", "lots"], "cannot read the size"),
    ],
)
def test_bad_input_exit_2(kernel: Path, args: list[str], message: str) -> None:
    r = run(kernel, "-i", "4,7,6", *FLAGS, *args)
    assert r.exit_code == 2, r.stdout
    assert message in r.stderr and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_bad_shape_exit_2(kernel: Path) -> None:
    r = run(kernel, "-i", "3,7,6", *FLAGS)
    assert r.exit_code == 2 and "expects 4 input channels" in r.stderr
    r = run(kernel, *FLAGS)
    assert r.exit_code == 2 and "--input-shape is required" in r.stderr


# ---------------------------------------------------------------------------------- model sources
@pytest.fixture
def state_dict(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(make_model(transposed=True).state_dict(), path)
    return path


MODEL = ["--model", "tests.verify_models:make_model", "--model-kwargs", '{"transposed": true}']


def test_model_source_per_layer_and_end_to_end(state_dict: Path) -> None:
    r = run(state_dict, *MODEL, "--input-shape", "2,3,12,12", "--trials", "1", "--json")
    assert r.exit_code == 0, r.stdout
    data = as_json(r)
    assert data["passed"] is True
    names = {e["name"] for e in data["layers"]}
    assert names == {"conv1", "conv2", "conv3", "up"}
    conv3 = next(e for e in data["layers"] if e["name"] == "conv3")
    assert conv3["input_shape"] == [8, 36]
    e2e = {e["form"]: e for e in data["end_to_end"]}
    assert set(e2e) == {"lc", "fc_dense", "fc_sparse"}
    assert all(e["passed"] and e["max_abs_error"] <= 1e-10 for e in e2e.values())
    assert e2e["lc"]["input_shape"] == [2, 3, 12, 12] and "kept: up" in e2e["lc"]["note"]


def test_model_source_layers_pattern_table(state_dict: Path) -> None:
    r = run(state_dict, *MODEL, "-i", "1,3,12,12", "--layers", "conv[12]", "--to", "fc",
            "--trials", "1")  # fmt: skip
    assert r.exit_code == 0, r.stdout
    assert "conv3" not in r.stdout and "(model)" in r.stdout
    assert "2 conv(s) converted" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("PASSED: 6 of 6")


def test_model_source_nan_weight_exit_1(tmp_path: Path) -> None:
    model = make_model()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = math.inf
    torch.save(model.state_dict(), tmp_path / "bad.pt")
    r = run(tmp_path / "bad.pt", "--model", "tests.verify_models:make_model",
            "-i", "1,3,12,12", "--to", "fc", "--trials", "1", "--json")  # fmt: skip
    assert r.exit_code == 1
    data = as_json(r)
    failed = {(e["name"], e["form"]) for e in data["layers"] if e["passed"] is False}
    assert ("conv2", "fc_dense") in failed and ("conv1", "fc_dense") not in failed
    assert all(e["passed"] is False for e in data["end_to_end"])


def test_help_lists_the_options() -> None:
    r = runner.invoke(app, ["verify", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for option in ("--to", "--dtype", "--trials", "--seed", "--rtol", "--atol", "--layers",
                   "--json", "--max-memory", "--model"):  # fmt: skip
        assert option in r.stdout


@pytest.mark.parametrize(
    ("layer", "shape", "flags"),
    [
        ("conv1", "3,12,12", ["--stride", "2", "--padding", "1", "--padding-mode", "reflect"]),
        ("conv2", "8,6,6", ["--dilation", "2", "--padding", "2", "--groups", "4"]),
        ("conv3", "8,36", ["--stride", "2", "--padding", "2", "--padding-mode", "circular"]),
    ],
)
def test_model_layers_as_kernel_files(
    tmp_path: Path, layer: str, shape: str, flags: list[str]
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in make_model().state_dict().items()}, path)
    r = run(path, "--layer", layer, "-i", shape, *flags, "--json", "--trials", "1")
    assert r.exit_code == 0, r.stderr
    data = as_json(r)
    assert data["passed"] and [e["name"] for e in data["layers"]] == [layer] * 5
    assert all(e["max_abs_error"] <= 1e-10 for e in data["layers"])
