"""Memory and disk are checked before any large allocation or write.

The limit is the machine's available memory (or --max-memory); a refusal gives the size and the
sparse or streaming alternative, and leaves nothing behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F

from convtool.resources import available_memory
from tests.cli_worker import PEAK_LIMIT, Worker
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


# ------------------------------------------------------------------ absurd sizes, every command
# (probe, extra args) x subcommand -> expected exit code and a word of the message. Every run
# stays under PEAK_LIMIT of resident memory: refusals come before any allocation, and what is
# accepted (summaries, analytic counts, shapes) never builds anything over output positions.
HUGE_INPUT = ["-i", "3,99999999,99999999"]
HUGE_PADDING = ["-i", "3,8,8", "--padding", "99999999"]
HUGE_STRIDE = ["-i", "3,8,8", "--stride", "99999999999999999999"]
PROBES: dict[str, list[str]] = {
    "input 3,99999999,99999999": HUGE_INPUT,
    "padding 99999999": HUGE_PADDING,
    "stride 99999999999999999999": HUGE_STRIDE,
    "groups 99999999999999999999": ["-i", "3,8,8", "--groups", "99999999999999999999"],
    "dilation 9223372036854775807": ["-i", "3,8,8", "--dilation", "9223372036854775807"],
    "input 3,2**62,2**62": ["-i", f"3,{2**62},{2**62}"],
}
SUBCOMMANDS: dict[str, list[str]] = {
    "toeplitz": [],
    "toeplitz -o T.npy": ["-o", "T.npy"],
    "toeplitz --sparse -o T.npz": ["--sparse", "-o", "T.npz"],
    "count-params": ["--json"],
    "inspect": ["--json"],
    "verify": ["--trials", "1"],
    "convert": ["--to", "lc", "-o", "m.pt"],
}
OK, NEEDS, INT64 = (0, ""), (2, "needs"), (2, "2**63 - 1")
EXPECTED: dict[str, dict[str, tuple[int, str]]] = {
    "input 3,99999999,99999999": {
        "toeplitz": OK, "toeplitz -o T.npy": NEEDS, "toeplitz --sparse -o T.npz": NEEDS,
        "count-params": OK, "inspect": OK, "verify": NEEDS, "convert": NEEDS,
    },
    "padding 99999999": {
        "toeplitz": OK, "toeplitz -o T.npy": NEEDS, "toeplitz --sparse -o T.npz": NEEDS,
        "count-params": OK, "inspect": OK, "verify": NEEDS, "convert": NEEDS,
    },
    "stride 99999999999999999999": dict.fromkeys(SUBCOMMANDS, INT64),
    "groups 99999999999999999999": dict.fromkeys(SUBCOMMANDS, INT64),
    "dilation 9223372036854775807": dict.fromkeys(SUBCOMMANDS, (2, "kernel size")),
    "input 3,2**62,2**62": dict.fromkeys(SUBCOMMANDS, INT64),
}  # fmt: skip


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("probes")
    np.save(folder / "w.npy", np.ones((4, 3, 3, 3), dtype=np.float32))
    return folder


@pytest.fixture(scope="module")
def worker(probe_dir: Path) -> Iterator[Worker]:
    w = Worker(probe_dir)
    yield w
    w.close()


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
@pytest.mark.parametrize("probe", list(PROBES))
def test_absurd_sizes_in_every_command(
    worker: Worker, probe_dir: Path, probe: str, command: str
) -> None:
    name = command.split(" ", 1)[0]
    args = [name, str(probe_dir / "w.npy"), *PROBES[probe], *SUBCOMMANDS[command]]
    result = worker.run(args)
    code, word = EXPECTED[probe][command]
    assert result["code"] == code, (args, result)
    assert "bug in convtool" not in result["stderr"] and "Traceback" not in result["stderr"]
    if code == 2:
        assert result["stderr"].count("\n") == 1 and word in result["stderr"], result["stderr"]
    assert result["peak"] < PEAK_LIMIT, (args, result["peak"])
    assert sorted(p.name for p in probe_dir.iterdir()) == ["w.npy"]  # nothing left behind


def test_huge_counts_are_exact(probe_dir: Path) -> None:
    result = run("count-params", probe_dir / "w.npy", *HUGE_PADDING, "--json")
    assert result.exit_code == 0, result.stderr
    layer = json.loads(result.stdout)["layers"][0]
    out = 8 + 2 * 99999999 - 2
    assert layer["output_shape"] == [4, out, out]
    assert layer["fc_params"] == 4 * out * out * 3 * 64
    assert layer["fc_nonzero"] == 4 * 3 * (8 * 3) ** 2  # only taps on the 8x8 input
