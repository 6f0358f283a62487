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
    assert data["tolerance"]["arithmetic_bound"] is True
    assert data["tolerance"]["source"].startswith("float32 rounding bound per element")
    assert data["inputs"] == ["random 0", "random 1", "ones", "zeros"]
    assert data["end_to_end"] is None
    assert len(data["layers"]) == 5
    for entry in data["layers"]:
        assert entry["name"] == "w" and entry["passed"] is True
        assert 0 <= entry["max_abs_error"] < 1e-5
        assert entry["max_rel_error"] >= 0 and entry["tightest_atol_at_rtol_0"] is not None
        assert 0 <= entry["bound_ratio"] <= 1 and entry["bound"] == data["tolerance"]["source"]


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


# --------------------------------------------------------------- budget, strict, nothing compared
def _last_line(r: Any) -> str:
    """The final PASSED/FAILED line, joined back where the terminal width wrapped it."""
    lines = r.stdout.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(("PASSED", "FAILED")))
    return " ".join(line.strip() for line in lines[start:])


def test_strict_turns_a_sampled_check_into_exit_1(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", torch.randn(32, 2, 3, 3).numpy())
    args = [tmp_path / "w.npy", "-i", "4,9,10", "--groups", "2", "--padding", "2", "--stride",
            "2", "--to", "toeplitz", "--max-memory", "400K", "--dtype", "float32"]  # fmt: skip
    lenient, strict = run(*args), run(*args, "--strict")
    assert lenient.exit_code == 0 and strict.exit_code == 1, strict.stdout
    line = _last_line(lenient)
    assert line.startswith("PASSED: 1 of 1 comparisons within tolerance (float32, within the")
    assert (
        "not checked: 1 skipped (w/toeplitz_dense: over the memory budget of 400.0 KiB "
        "(max_memory)); 1 checked in part (w/toeplitz_sampled: only the rows of " in line
    )
    assert "the whole form over the memory budget" in line
    assert _last_line(strict).startswith("FAILED (--strict): 1 of 1 comparisons within")
    assert "[strict: a failure]" in _last_line(strict)
    data = json.loads(run(*args, "--strict", "--json").stdout)
    assert data["passed"] is False and data["strict"] is True
    assert data["summary"]["skipped"] == 1 and data["summary"]["partial"] == 1


def test_budget_is_total_memory_not_free_memory(
    kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convtool.resources as resources

    first = as_json(run(kernel, "-i", "4,7,6", *FLAGS, "--json"))
    # momentary free memory no longer matters: almost none free, same checks, same verdict
    monkeypatch.setattr(resources, "available_memory", lambda: 1024)
    second = as_json(run(kernel, "-i", "4,7,6", *FLAGS, "--json"))
    assert first["summary"] == second["summary"] == {
        "passed": 5, "failed": 0, "skipped": 0, "not applicable": 0, "partial": 0,
    }  # fmt: skip
    # the budget is the machine's total memory (or the process limit), the same on each run
    total = resources.total_memory()
    assert total == resources.total_memory() and total > 1024
    assert resources.memory_budget(None) == resources.Budget(total, "total memory")


def test_nothing_compared_exit_2_with_one_line(kernel: Path) -> None:
    r = run(kernel, "-i", "4,7,6", *FLAGS, "--max-memory", "0")
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing was compared" in lines[0]
    assert "memory budget of 0 B (max_memory)" in lines[0] and "Traceback" not in r.stderr


def test_transposed_lc_only_compares_nothing_exit_2(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", torch.randn(4, 3, 3, 2).numpy())
    r = run(tmp_path / "t.npy", "-i", "4,5,4", "--transposed", "--to", "lc")
    assert r.exit_code == 2 and "nothing was compared" in r.stderr
    assert "no locally-connected form" in r.stderr


def test_one_layer_called_at_two_sizes_reports_each(tmp_path: Path) -> None:
    from tests.test_verify_bounds import make_two_sizes

    torch.save(make_two_sizes().state_dict(), tmp_path / "two.pt")
    r = run(tmp_path / "two.pt", "--model", "tests.test_verify_bounds:make_two_sizes",
            "-i", "1,2,8,8", "--layer", "conv", "--trials", "1", "--to", "fc")  # fmt: skip
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "conv @ (2, 8, 8)" in r.stdout and "conv @ (2, 4, 4)" in r.stdout
    assert "called on 2 input shapes" in r.stdout
    data = as_json(run(tmp_path / "two.pt", "--model", "tests.test_verify_bounds:make_two_sizes",
                       "-i", "1,2,8,8", "--layer", "conv", "--trials", "1", "--json"))  # fmt: skip
    assert {tuple(e["input_shape"]) for e in data["layers"]} == {(2, 8, 8), (2, 4, 4)}
