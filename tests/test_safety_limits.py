"""Memory and disk are checked before any large allocation or write.

The limit is the machine's available memory (or --max-memory); a refusal gives the size and the
sparse or streaming alternative, and leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F

from convtool.resources import available_memory
from tests.safety_helpers import one_line_error, run


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "w.npy", rng.standard_normal((4, 4, 3, 3)).astype(np.float32) / 6)
    return tmp_path / "w.npy"


# 16 channels at 2048 x 2048: the dense matrix has 4.5e15 entries (16 PiB in float32)
PETA = ["-i", "16,2048,2048", "--padding", "1"]


@pytest.mark.parametrize("out", ["T.npy", "T.pt", "T.safetensors"])
def test_petabytes_of_dense_matrix_are_refused(tmp_path: Path, out: str) -> None:
    np.save(tmp_path / "big.npy", np.ones((16, 16, 3, 3), dtype=np.float32))
    message = one_line_error(run("toeplitz", tmp_path / "big.npy", *PETA, "-o", tmp_path / out))
    assert "16.0 PiB" in message and "--sparse" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy"]


def test_petabytes_refused_by_convert_and_sparse_too_big(tmp_path: Path) -> None:
    np.save(tmp_path / "big.npy", np.ones((16, 16, 3, 3), dtype=np.float32))
    for to in (["--to", "fc"], ["--to", "fc", "--sparse"], ["--to", "lc"]):
        message = one_line_error(
            run("convert", tmp_path / "big.npy", *PETA, *to, "-o", tmp_path / "m.pt2")
        )
        assert "needs" in message and "available memory" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy"]


def test_counting_a_huge_layer_costs_nothing(tmp_path: Path) -> None:
    np.save(tmp_path / "big.npy", np.ones((16, 16, 3, 3), dtype=np.float32))
    result = run("count-params", tmp_path / "big.npy", *PETA, "--json")
    assert result.exit_code == 0, result.stderr
    import json

    layer = json.loads(result.stdout)["layers"][0]
    assert layer["fc_params"] == (16 * 2048 * 2048) ** 2  # no bias


def test_dense_too_big_for_memory_but_sparse_works(kernel: Path, tmp_path: Path) -> None:
    """4 channels at 256x256: dense T is 256 GiB, more than this machine has; sparse is 9.4 M."""
    args = ["-i", "4,256,256", "--padding", "1"]
    dense_bytes = (4 * 256 * 256) ** 2 * 4
    assert dense_bytes > available_memory()
    message = one_line_error(run("toeplitz", kernel, *args, "-o", tmp_path / "T.pt"))
    assert "256.0 GiB" in message and "--sparse" in message
    result = run("toeplitz", kernel, *args, "--sparse", "-o", tmp_path / "T.npz")
    assert result.exit_code == 0, result.stderr
    t = scipy.sparse.load_npz(tmp_path / "T.npz")
    w = torch.from_numpy(np.load(kernel))
    x = torch.randn(4, 256, 256)
    y = torch.from_numpy(t @ x.flatten().numpy())
    torch.testing.assert_close(y, F.conv2d(x[None], w, padding=1).flatten(), rtol=1e-4, atol=1e-4)


def test_sparse_fc_model_when_dense_does_not_fit(kernel: Path, tmp_path: Path) -> None:
    args = ["-i", "4,256,256", "--padding", "1", "--to", "fc"]
    one_line_error(run("convert", kernel, *args, "-o", tmp_path / "m.pt"))
    result = run("convert", kernel, *args, "--sparse", "-o", tmp_path / "m.pt")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "m.pt").stat().st_size > 9_000_000 * 4


def test_max_memory_flag_overrides_the_machine(kernel: Path, tmp_path: Path) -> None:
    args = ["-i", "4,16,16", "--max-memory", "2M"]  # dense T: 3.1 MiB, sparse: ~0.4 MiB
    message = one_line_error(run("toeplitz", kernel, *args, "-o", tmp_path / "T.pt"))
    assert "--max-memory is 2.0 MiB" in message
    assert run("toeplitz", kernel, *args, "--sparse", "-o", tmp_path / "T.pt").exit_code == 0
    message = one_line_error(run("toeplitz", kernel, "-i", "4,16,16", "--max-memory", "lots"))
    assert "'lots'" in message


def test_streamed_npy_needs_the_disk_not_the_memory(kernel: Path, tmp_path: Path) -> None:
    """.npy is written in row blocks: a matrix bigger than --max-memory still works."""
    out = tmp_path / "T.npy"
    result = run("toeplitz", kernel, "-i", "4,24,24", "--max-memory", "64K", "-o", out)
    assert result.exit_code == 0, result.stderr
    t = torch.from_numpy(np.load(out))
    assert t.numel() * 4 > 64 * 1024
    w = torch.from_numpy(np.load(kernel))
    x = torch.randn(4, 24, 24)
    torch.testing.assert_close(t @ x.flatten(), F.conv2d(x[None], w).flatten())
