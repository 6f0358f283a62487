"""Bad input, for every subcommand: one line on stderr naming the problem, exit 2, no traceback
(unless --debug), and no output file left behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.safety_helpers import COMMANDS, REPO, one_line_error, run

Maker = Callable[[Path], tuple[Path, list[str]]]


def _kernel(tmp: Path, array: np.ndarray, name: str = "w.npy") -> Path:
    path = tmp / name
    np.save(path, array)
    return path


def _good(tmp: Path) -> Path:
    return _kernel(tmp, np.ones((4, 2, 3, 3), dtype=np.float32))


def empty(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "w.pt").write_bytes(b"")
    return tmp / "w.pt", ["-i", "2,8,8"]


def truncated_pt(tmp: Path) -> tuple[Path, list[str]]:
    torch.save(torch.nn.Conv2d(2, 4, 3).state_dict(), tmp / "full.pt")
    data = (tmp / "full.pt").read_bytes()
    (tmp / "full.pt").unlink()
    (tmp / "w.pt").write_bytes(data[: len(data) // 2])
    return tmp / "w.pt", ["-i", "2,8,8"]


def truncated_npy(tmp: Path) -> tuple[Path, list[str]]:
    data = _good(tmp).read_bytes()
    (tmp / "w.npy").write_bytes(data[:-10])
    return tmp / "w.npy", ["-i", "2,8,8"]


def truncated_safetensors(tmp: Path) -> tuple[Path, list[str]]:
    save_file({"weight": torch.ones(4, 2, 3, 3)}, str(tmp / "w.safetensors"))
    data = (tmp / "w.safetensors").read_bytes()
    (tmp / "w.safetensors").write_bytes(data[:-20])
    return tmp / "w.safetensors", ["-i", "2,8,8"]


def wrong_format(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "w.pt").write_text("this is a text file, not a checkpoint\n")
    return tmp / "w.pt", ["-i", "2,8,8"]


def wrong_extension(tmp: Path) -> tuple[Path, list[str]]:
    data = _good(tmp).read_bytes()
    (tmp / "w.npy").unlink()
    (tmp / "w.safetensors").write_bytes(data)
    return tmp / "w.safetensors", ["-i", "2,8,8"]


def unknown_extension(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "w.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    return tmp / "w.h5", ["-i", "2,8,8"]


def missing_file(tmp: Path) -> tuple[Path, list[str]]:
    return tmp / "nope.npy", ["-i", "2,8,8"]


def directory(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "dir.npy").mkdir()
    return tmp / "dir.npy", ["-i", "2,8,8"]


def wrong_rank(tmp: Path) -> tuple[Path, list[str]]:
    return _kernel(tmp, np.ones((4, 2), dtype=np.float32)), ["-i", "2,8,8"]


def rank_six(tmp: Path) -> tuple[Path, list[str]]:
    return _kernel(tmp, np.ones((1, 1, 1, 1, 1, 1), dtype=np.float32)), ["-i", "1,2,2,2,2"]


def zero_size_kernel(tmp: Path) -> tuple[Path, list[str]]:
    return _kernel(tmp, np.ones((4, 0, 3, 3), dtype=np.float32)), ["-i", "2,8,8"]


def string_array(tmp: Path) -> tuple[Path, list[str]]:
    return _kernel(tmp, np.array([["a", "b"]])), ["-i", "2,8,8"]


def missing_keys(tmp: Path) -> tuple[Path, list[str]]:
    from tests.models_for_tests import make_mixed

    state = make_mixed().state_dict()
    state.pop(next(iter(state)))
    torch.save(state, tmp / "w.pt")
    return tmp / "w.pt", ["--model", "tests.models_for_tests:make_mixed", "-i", "2,3,16,16"]


def channels(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "3,8,8"]


def kernel_too_large(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "2,2,8"]


def groups(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "2,8,8", "--groups", "3"]


def zero_size(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "2,0,8"]


def negative_size(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "2,-8,8"]


def malformed_shape(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "2;8;8"]


def padding_mode(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "2,8,8", "--padding-mode", "mirror"]


def negative_stride(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "2,8,8", "--stride", "-1"]


def reflect_too_wide(tmp: Path) -> tuple[Path, list[str]]:
    return _good(tmp), ["-i", "2,3,8", "--padding", "3", "--padding-mode", "reflect"]


CASES: dict[str, tuple[Maker, str]] = {
    "empty": (empty, "empty"),
    "truncated .pt": (truncated_pt, "cannot read"),
    "truncated .npy": (truncated_npy, "cannot read"),
    "truncated .safetensors": (truncated_safetensors, "cannot read"),
    "wrong format": (wrong_format, "w.pt"),
    "wrong extension": (wrong_extension, "w.safetensors"),
    "unknown extension": (unknown_extension, "w.h5"),
    "missing file": (missing_file, "does not exist"),
    "directory": (directory, "directory"),
    "wrong rank": (wrong_rank, "3, 4 or 5 dims"),
    "rank six": (rank_six, "3, 4 or 5 dims"),
    "zero-size kernel": (zero_size_kernel, "positive"),
    "string array": (string_array, "not a real numeric array"),
    "missing keys": (missing_keys, "missing"),
    "channels": (channels, "input channels"),
    "kernel too large": (kernel_too_large, "kernel size can't be greater"),
    "groups": (groups, "groups"),
    "zero size": (zero_size, "positive"),
    "negative size": (negative_size, "positive"),
    "malformed shape": (malformed_shape, "--input-shape"),
    "padding mode": (padding_mode, "padding_mode"),
    "negative stride": (negative_stride, "stride"),
    "reflect too wide": (reflect_too_wide, "reflect padding"),
}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # --model MODULE:CALLABLE is imported from the current folder


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(tmp_path: Path, command: str, case: str) -> None:
    make, expected = CASES[case]
    source, args = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = ["-o", tmp_path / "out.pt"] if command == "convert" else []
    message = one_line_error(run(command, source, *args, *COMMANDS[command], *extra))
    assert expected in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    source, args = kernel_too_large(tmp_path)
    result = run("--debug", "toeplitz", source, *args)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "ConvtoolError" in result.stderr


@pytest.mark.parametrize("command", ["toeplitz", "convert"])
def test_nonfinite_weights_are_refused(tmp_path: Path, command: str) -> None:
    w = np.ones((4, 2, 3, 3), dtype=np.float32)
    w[0, 0, 0, 0] = np.inf
    source = _kernel(tmp_path, w)
    extra = ["-o", tmp_path / "out.pt"] if command == "convert" else []
    message = one_line_error(run(command, source, "-i", "2,8,8", *COMMANDS[command], *extra))
    assert "NaN/inf" in message and "--allow-nonfinite" in message
    assert not (tmp_path / "out.pt").exists()


def test_nonfinite_weights_fail_verification(tmp_path: Path) -> None:
    w = np.ones((4, 2, 3, 3), dtype=np.float32)
    w[1, 1, 1, 1] = np.nan
    result = run("verify", _kernel(tmp_path, w), "-i", "2,8,8", "--trials", "1")
    assert result.exit_code == 1
    assert "FAILED" in result.stdout


# ------------------------------------------------------------------ NaN/inf, dtypes, byte order
def _nan_kernel(tmp: Path) -> Path:
    w = np.ones((4, 2, 3, 3), dtype=np.float32)
    w[0, 0, 0, 0] = np.inf
    w[1, 1, 1, 1] = np.nan
    return _kernel(tmp, w)


@pytest.mark.parametrize("command", ["toeplitz", "convert", "count-params", "inspect"])
def test_nonfinite_weights_are_refused_by_every_command_but_verify(
    tmp_path: Path, command: str
) -> None:
    """Same treatment everywhere (README): exit 2 naming the flag; --allow-nonfinite lets the
    run go through (verify instead reports the failed comparison, exit 1)."""
    source = _nan_kernel(tmp_path)
    extra = ["-o", tmp_path / "out.pt"] if command == "convert" else []
    message = one_line_error(run(command, source, "-i", "2,8,8", *COMMANDS[command], *extra))
    assert "2 NaN/inf" in message and "--allow-nonfinite" in message
    assert not (tmp_path / "out.pt").exists()
    allowed = run(command, source, "-i", "2,8,8", *COMMANDS[command], *extra, "--allow-nonfinite")
    assert allowed.exit_code == 0, allowed.stderr


def test_nonfinite_model_weights_are_refused_too(tmp_path: Path) -> None:
    from tests.models_for_tests import make_mixed

    model = make_mixed()
    state = model.state_dict()
    first = next(k for k, v in state.items() if k.endswith("weight") and v.dim() >= 3)
    state[first].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "m.pt")
    args = ["--model", "tests.models_for_tests:make_mixed", "-i", "2,3,16,16"]
    for command in ("count-params", "inspect"):
        message = one_line_error(run(command, tmp_path / "m.pt", *args))
        assert "NaN/inf" in message
    assert run("verify", tmp_path / "m.pt", *args, "--trials", "1").exit_code == 1


@pytest.mark.parametrize("command", list(COMMANDS))
def test_float8_kernel_is_refused_clearly(tmp_path: Path, command: str) -> None:
    save_file({"weight": torch.ones(4, 2, 3, 3).to(torch.float8_e4m3fn)}, str(tmp_path / "w.st"))
    (tmp_path / "w.st").rename(tmp_path / "w.safetensors")
    extra = ["-o", tmp_path / "out.pt"] if command == "convert" else []
    source = tmp_path / "w.safetensors"
    message = one_line_error(run(command, source, "-i", "2,8,8", *COMMANDS[command], *extra))
    assert "float8_e4m3fn" in message and "float32" in message


def test_big_endian_npy_is_read(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((4, 2, 3, 3))
    np.save(tmp_path / "w.npy", w.astype(">f8"))
    np.savez(tmp_path / "w.npz", weight=w.astype(">f4"))
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    for name, dtype in (("w.npy", torch.float64), ("w.npz", torch.float32)):
        out = tmp_path / f"T_{name}.npy"
        result = run("toeplitz", tmp_path / name, "-i", "2,7,8", "--padding", "1", "-o", out)
        assert result.exit_code == 0, result.stderr
        t = torch.from_numpy(np.load(out))
        assert t.dtype == dtype
        expected = F.conv2d(x[None], torch.from_numpy(w), padding=1).flatten()
        torch.testing.assert_close(t.double() @ x.flatten(), expected, rtol=1e-5, atol=1e-5)


def test_int_kernel_is_computed_exactly_in_float64(tmp_path: Path) -> None:
    w = np.arange(72, dtype=np.int32).reshape(4, 2, 3, 3) % 5 - 2
    np.save(tmp_path / "w.npy", w)
    result = run("toeplitz", tmp_path / "w.npy", "-i", "2,6,6", "-o", tmp_path / "T.npy")
    assert result.exit_code == 0, result.stderr
    t = torch.from_numpy(np.load(tmp_path / "T.npy"))
    assert t.dtype == torch.float64
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    expected = F.conv2d(x[None], torch.from_numpy(w).double()).flatten()
    torch.testing.assert_close(t @ x.flatten(), expected)
    assert run("verify", tmp_path / "w.npy", "-i", "2,6,6", "--trials", "1").exit_code == 0
