"""`convtool toeplitz` end to end: every output format checked against torch's conv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from convtool import matrix_output
from convtool.cli import app

runner = CliRunner()


def run(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def kernel(tmp_path: Path) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2, 3, 2, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    np.save(tmp_path / "w.npy", w.numpy())
    np.save(tmp_path / "b.npy", b.numpy())
    return tmp_path / "w.npy", tmp_path / "b.npy", w, b


FLAGS = ["--stride", "2,1", "--padding", "1,2", "--dilation", "1,2", "--groups", "2"]
SHAPE = (4, 7, 6)


def oracle(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x[None], w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)


def check(t: torch.Tensor, bias: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    x = torch.randn(SHAPE, dtype=torch.float64)
    got = t @ x.flatten() + bias
    torch.testing.assert_close(got, oracle(w, b, x).flatten(), rtol=1e-12, atol=1e-12)


def test_npy_dense_with_bias_sibling(kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wpath, bpath, w, b = kernel
    out = tmp_path / "T.npy"
    r = run("toeplitz", wpath, "--input-shape", "4,7,6", "--bias", bpath, *FLAGS, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "matrix shape" in r.stdout
    t = torch.from_numpy(np.load(out))
    check(t, torch.from_numpy(np.load(tmp_path / "T.bias.npy")), w, b)


def test_npy_streams_in_row_blocks(kernel, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    wpath, _, w, _ = kernel
    monkeypatch.setattr(matrix_output, "BLOCK_BYTES", 3 * 8 * 168)  # three rows a block
    out = tmp_path / "T.npy"
    r = run("toeplitz", wpath, "-i", "1,4,7,6", *FLAGS, "-o", out)
    assert r.exit_code == 0, r.stderr
    check(torch.from_numpy(np.load(out)), torch.zeros(()), w, None)  # type: ignore[arg-type]


def test_npz_mtx_pt_safetensors(kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wpath, bpath, w, b = kernel
    common = ["--input-shape", "4,7,6", "--bias", bpath, *FLAGS]
    assert run("toeplitz", wpath, *common, "-o", tmp_path / "T.npz").exit_code == 0
    m = scipy.sparse.load_npz(tmp_path / "T.npz")
    with np.load(tmp_path / "T.npz") as z:
        bias = torch.from_numpy(z["bias"])
    check(torch.from_numpy(m.toarray()), bias, w, b)

    assert run("toeplitz", wpath, *common, "-o", tmp_path / "T.mtx").exit_code == 0
    m = scipy.io.mmread(tmp_path / "T.mtx")
    check(torch.from_numpy(m.toarray()), torch.from_numpy(np.load(tmp_path / "T.bias.npy")), w, b)

    for sparse in ([], ["--sparse"]):
        out = tmp_path / f"T{len(sparse)}.pt"
        assert run("toeplitz", wpath, *common, *sparse, "-o", out).exit_code == 0
        saved = torch.load(out, weights_only=True)
        t = saved["matrix"].to_dense() if sparse else saved["matrix"]
        check(t, saved["bias"], w, b)
        assert json.loads(saved["meta"])["input_shape"] == [4, 7, 6]

        out = tmp_path / f"T{len(sparse)}.safetensors"
        assert run("toeplitz", wpath, *common, *sparse, "-o", out).exit_code == 0
        st = load_file(out)
        if sparse:
            t = torch.sparse_csr_tensor(
                st["matrix.crow_indices"],
                st["matrix.col_indices"],
                st["matrix.values"],
                (6 * 4 * 8, 4 * 7 * 6),
            ).to_dense()
        else:
            t = st["matrix"]
        check(t, st["bias"], w, b)


def test_json_summary(kernel) -> None:  # type: ignore[no-untyped-def]
    wpath, _, _, _ = kernel
    r = run("toeplitz", wpath, "--input-shape", "4,7,6", *FLAGS, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["matrix_shape"] == [6 * 4 * 8, 4 * 7 * 6]
    assert data["output_shape"] == [6, 4, 8]
    assert data["outputs"] == []
    assert 0 < data["nnz"] < data["matrix_shape"][0] * data["matrix_shape"][1]
    assert data["dense_bytes"] == 192 * 168 * 8


def test_seed_example_from_samples(tmp_path: Path) -> None:
    sample = Path(__file__).parents[1] / "samples" / "seed_kernel.npy"
    r = run("toeplitz", sample, "--input-shape", "3,7,9", "-o", tmp_path / "T.npy")
    assert r.exit_code == 0, r.stderr
    t = torch.from_numpy(np.load(tmp_path / "T.npy"))
    assert t.shape == (140, 189)
    w = torch.from_numpy(np.load(sample))
    x = torch.randn(3, 7, 9)
    torch.testing.assert_close(t @ x.flatten(), F.conv2d(x[None], w).flatten())


def test_never_overwrites_without_force(kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wpath, _, _, _ = kernel
    out = tmp_path / "T.npy"
    out.write_bytes(b"precious")
    r = run("toeplitz", wpath, "--input-shape", "4,7,6", *FLAGS, "-o", out)
    assert r.exit_code == 2
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = run("toeplitz", wpath, "--input-shape", "4,7,6", *FLAGS, "-o", out, "--force")
    assert r.exit_code == 0
    assert np.load(out).shape == (192, 168)


def test_refuses_to_overwrite_its_input(kernel) -> None:  # type: ignore[no-untyped-def]
    wpath, _, _, _ = kernel
    before = wpath.read_bytes()
    r = run("toeplitz", wpath, "--input-shape", "4,7,6", *FLAGS, "-o", wpath, "--force")
    assert r.exit_code == 2 and "input file" in r.stderr
    assert wpath.read_bytes() == before


def test_failed_write_leaves_nothing(kernel, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    wpath, _, _, _ = kernel

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matrix_output.mf, "write_npz", boom)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run("toeplitz", wpath, "--input-shape", "4,7,6", *FLAGS, "-o", out_dir / "T.npz")
    assert r.exit_code == 2
    assert "no space left" in r.stderr
    assert list(out_dir.iterdir()) == []


def test_huge_dense_is_refused_instantly(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.ones((64, 64, 3, 3), dtype=np.float32))
    out = tmp_path / "T.npy"
    # 64 x 8192 x 8192 inputs -> a (4.3e9 x 4.3e9) dense matrix: ~74 EB
    r = run("toeplitz", tmp_path / "w.npy", "-i", "64,8192,8192", "--padding", "1", "-o", out)
    assert r.exit_code == 2
    assert "needs" in r.stderr and "--sparse" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npy"]
    r = run(
        "toeplitz",
        tmp_path / "w.npy",
        "-i",
        "64,8192,8192",
        "--padding",
        "1",
        "-o",
        tmp_path / "T.pt",
    )
    assert r.exit_code == 2 and "--sparse" in r.stderr


def test_max_memory_refuses_dense_but_sparse_works(kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wpath, _, w, _ = kernel
    args = ["toeplitz", wpath, "--input-shape", "4,7,6", *FLAGS, "--max-memory", "100K"]
    r = run(*args, "-o", tmp_path / "T.pt")
    assert r.exit_code == 2 and "--max-memory" in r.stderr
    r = run(*args, "--sparse", "-o", tmp_path / "T.pt")
    assert r.exit_code == 0, r.stderr
    check(torch.load(tmp_path / "T.pt")["matrix"].to_dense(), torch.zeros(()), w, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-shape", "5,7,6"], "expects 4 input channels"),
        (["--input-shape", "4,2,2"], "kernel size can't be greater"),
        (["--input-shape", "4,x,6"], "--input-shape must be comma-separated integers"),
        (["--input-shape", "4,7"], "3 numbers"),
        (["--input-shape", "4,7,6", "--groups", "4"], "divisible by groups"),
        (["--input-shape", "4,7,6", "--groups", "3"], "(2 per group x groups=3)"),
        (["--input-shape", "4,7,6", "--padding-mode", "mirror"], "padding_mode must be one of"),
        (["--input-shape", "4,7,6", "-o", "T.txt"], "cannot tell the output format"),
        (["--input-shape", "4,7,6", "--sparse", "-o", "T.npy"], "holds a dense matrix"),
        (["--input-shape", "4,7,6", "-o", "/nonexistent/dir/T.npy"], "does not exist"),
        (["--input-shape", "4,7,6", "--stride", "1,2,3"], "stride must have 2 element"),
        ([], "--input-shape is required"),
    ],
)
def test_bad_input_is_one_line_exit_2(kernel, args, message) -> None:  # type: ignore[no-untyped-def]
    wpath, _, _, _ = kernel
    groups = [] if "--groups" in args else ["--groups", "2"]
    r = run("toeplitz", wpath, *groups, *args)
    assert r.exit_code == 2, r.stdout
    assert message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(
    "content, name, message",
    [
        (b"", "w.npy", "is empty"),
        (b"not a numpy file at all", "w.npy", "not a NumPy .npy file"),
        (b"PK\x03\x04truncated", "w.pt", "cannot read"),
        (b"\x00" * 10, "w.safetensors", "cannot read"),
        (b"hello", "w.txt", "cannot tell the format"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, name: str, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    r = run("toeplitz", path, "--input-shape", "3,7,9")
    assert r.exit_code == 2
    assert message in r.stderr and r.stderr.count("\n") == 1


def test_truncated_npy(kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wpath, _, _, _ = kernel
    cut = tmp_path / "cut.npy"
    cut.write_bytes(wpath.read_bytes()[:-40])
    r = run("toeplitz", cut, "--input-shape", "4,7,6", "--groups", "2")
    assert r.exit_code == 2 and "cannot read" in r.stderr


def test_nonfinite_weights_refused_unless_allowed(tmp_path: Path) -> None:
    w = np.ones((2, 1, 3), dtype=np.float32)
    w[1, 0, 2] = np.nan
    np.save(tmp_path / "w.npy", w)
    r = run("toeplitz", tmp_path / "w.npy", "-i", "1,5")
    assert r.exit_code == 2 and "NaN/inf" in r.stderr and "--allow-nonfinite" in r.stderr
    r = run(
        "toeplitz", tmp_path / "w.npy", "-i", "1,5", "--allow-nonfinite", "-o", tmp_path / "T.npy"
    )
    assert r.exit_code == 0
    assert np.isnan(np.load(tmp_path / "T.npy")).sum() == 3


def test_kernel_inside_a_state_dict(tmp_path: Path) -> None:
    conv = torch.nn.Conv1d(2, 3, 3, bias=True)
    torch.save(
        {
            "state_dict": {
                "module.enc.weight": conv.weight,
                "module.enc.bias": conv.bias,
                "module.fc.weight": torch.zeros(3, 3),
            }
        },
        tmp_path / "ck.pt",
    )
    r = run("toeplitz", tmp_path / "ck.pt", "-i", "2,8", "-o", tmp_path / "T.pt")
    assert r.exit_code == 0, r.stderr
    saved = torch.load(tmp_path / "T.pt", weights_only=True)
    x = torch.randn(2, 8)
    torch.testing.assert_close(
        saved["matrix"] @ x.flatten() + saved["bias"], conv(x[None]).detach().flatten()
    )


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "convtool", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("convtool ")
