"""No file runs code on load unless the user opts in with --allow-pickle."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.safety_helpers import COMMANDS, one_line_error, run


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _torch_save(path: Path, marker: Path) -> None:
    torch.save({"conv.weight": torch.zeros(2, 1, 3), "evil": Payload(marker)}, path)


def _raw_pickle(path: Path, marker: Path) -> None:
    with path.open("wb") as f:
        pickle.dump({"weight": Payload(marker)}, f)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("make", [_torch_save, _raw_pickle], ids=["torch.save", "pickle"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_malicious_pickle_never_runs(tmp_path: Path, command: str, make, suffix: str) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "PWNED"
    evil = tmp_path / f"evil{suffix}"
    make(evil, marker)
    extra = ["-o", tmp_path / "out.pt"] if command == "convert" else []
    result = run(command, evil, "--input-shape", "1,8", *COMMANDS[command], *extra)
    message = one_line_error(result)
    assert not marker.exists(), "the payload ran"
    assert str(evil.name) in message and "--allow-pickle" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([evil.name])


def test_pickled_numpy_object_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "kernel.npy"
    np.save(evil, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    for command in COMMANDS:
        extra = ["-o", tmp_path / "out.pt"] if command == "convert" else []
        message = one_line_error(run(command, evil, "-i", "1,8", *COMMANDS[command], *extra))
        assert "kernel.npy" in message
    assert not marker.exists()


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "kernel.npz"
    np.savez(evil, weight=np.array([Payload(marker)], dtype=object))
    one_line_error(run("toeplitz", evil, "-i", "1,8"))
    assert not marker.exists()


def test_opt_in_flag_is_named_and_required(tmp_path: Path) -> None:
    """A plainly pickled conv module loads only with --allow-pickle."""
    conv = torch.nn.Conv1d(1, 2, 3)
    path = tmp_path / "module.pt"
    torch.save(conv, path)
    message = one_line_error(run("inspect", path))
    assert "--allow-pickle" in message and "module.pt" in message
    result = run("inspect", path, "--allow-pickle", "--json")
    assert result.exit_code == 0, result.stderr
