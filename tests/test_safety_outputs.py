"""Outputs are written atomically (temp file + rename), never over an existing file without
--force, never over an input; unwritable folders, a full disk and an interrupted write leave
nothing behind."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from convtool import matrix_output
from convtool.cli import convert_cmd
from tests.safety_helpers import one_line_error, run

WRITERS = {
    "toeplitz": (["-i", "2,8,8"], matrix_output.mf, "write_pt"),
    "convert": (["-i", "2,8,8", "--to", "fc"], convert_cmd.mfiles, "write_state_dict"),
}


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    np.save(tmp_path / "w.npy", np.ones((4, 2, 3, 3), dtype=np.float32))
    return tmp_path / "w.npy"


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("command", list(WRITERS))
def test_existing_output_is_kept_without_force(kernel: Path, command: str) -> None:
    args = WRITERS[command][0]
    out = kernel.parent / "out.pt"
    out.write_bytes(b"precious")
    message = one_line_error(run(command, kernel, *args, "-o", out))
    assert "already exists" in message and "--force" in message
    assert out.read_bytes() == b"precious"
    assert listing(kernel.parent) == ["out.pt", "w.npy"]
    result = run(command, kernel, *args, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() != b"precious"
    assert listing(kernel.parent) == ["out.pt", "w.npy"]  # no temporary left


@pytest.mark.parametrize("command", list(WRITERS))
def test_input_is_never_overwritten(kernel: Path, command: str) -> None:
    source = kernel.with_suffix(".pt")
    torch.save(torch.from_numpy(np.load(kernel)), source)
    before = source.read_bytes()
    message = one_line_error(run(command, source, *WRITERS[command][0], "-o", source, "--force"))
    assert "input file" in message
    assert source.read_bytes() == before


def test_toeplitz_refuses_to_write_over_its_bias_input(kernel: Path) -> None:
    np.save(kernel.parent / "T.bias.npy", np.zeros(4, dtype=np.float32))
    before = (kernel.parent / "T.bias.npy").read_bytes()
    message = one_line_error(
        run(
            "toeplitz",
            kernel,
            "-i",
            "2,8,8",
            "--bias",
            kernel.parent / "T.bias.npy",
            "-o",
            kernel.parent / "T.npy",
            "--force",
        )
    )
    assert "input file" in message
    assert (kernel.parent / "T.bias.npy").read_bytes() == before


@pytest.mark.parametrize("command", list(WRITERS))
def test_missing_output_folder(kernel: Path, command: str) -> None:
    args = WRITERS[command][0]
    message = one_line_error(run(command, kernel, *args, "-o", kernel.parent / "no" / "o.pt"))
    assert "does not exist" in message


@pytest.mark.parametrize("command", list(WRITERS))
def test_full_disk_leaves_nothing(kernel: Path, command: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    args, module, name = WRITERS[command]
    real = getattr(module, name)

    def fill_then_fail(path, *a, **k):  # type: ignore[no-untyped-def]
        real(path, *a, **k)  # a partial file exists now
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module, name, fill_then_fail)
    message = one_line_error(run(command, kernel, *args, "-o", kernel.parent / "out.pt"))
    assert "no space left" in message
    assert listing(kernel.parent) == ["w.npy"]


@pytest.mark.parametrize("command", list(WRITERS))
def test_interrupted_write_leaves_nothing(kernel: Path, command: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    args, module, name = WRITERS[command]
    real = getattr(module, name)

    def interrupted(path, *a, **k):  # type: ignore[no-untyped-def]
        real(path, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, interrupted)
    result = run(command, kernel, *args, "-o", kernel.parent / "out.pt")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert listing(kernel.parent) == ["w.npy"]


def test_streamed_npy_failure_leaves_nothing(kernel: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def failing_blocks(*args, **kwargs) -> Iterator[tuple[int, object]]:  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        yield  # pragma: no cover

    monkeypatch.setattr(matrix_output, "dense_row_blocks", failing_blocks)
    one_line_error(run("toeplitz", kernel, "-i", "2,8,8", "-o", kernel.parent / "T.npy"))
    assert listing(kernel.parent) == ["w.npy"]


@contextlib.contextmanager
def read_only_folder(base: Path) -> Iterator[Path]:
    """A folder nobody may write to. Root ignores permission bits, so for root it is a
    read-only bind mount; otherwise chmod 0555."""
    folder = base / "locked"
    folder.mkdir()
    if os.getuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    source = base / "locked-src"
    source.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(folder)]
        if subprocess.run(remount, capture_output=True).returncode != 0:
            pytest.skip("root cannot remount read-only here")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
@pytest.mark.parametrize("command", list(WRITERS))
def test_read_only_output_folder(kernel: Path, command: str) -> None:
    with read_only_folder(kernel.parent) as locked:
        with pytest.raises(OSError):  # the folder really is read-only
            (locked / "probe").write_bytes(b"")
        message = one_line_error(
            run(command, kernel, *WRITERS[command][0], "-o", locked / "out.pt")
        )
        assert "not writable" in message
        assert list(locked.iterdir()) == []


def test_convert_refuses_a_disk_too_small_before_building_any_form(
    kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import convtool.convert as cv
    import convtool.resources as resources

    def built(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a form was built before the disk check")

    monkeypatch.setattr(cv, "to_locally_connected", built)
    free = shutil.disk_usage(kernel.parent)._replace(free=10)
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda folder: free)
    message = one_line_error(
        run("convert", kernel, "-i", "1,2,8,8", "--to", "lc", "-o", kernel.parent / "o.pt")
    )
    assert "on disk" in message and "--layers" in message
    assert listing(kernel.parent) == ["w.npy"]
