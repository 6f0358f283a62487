"""CLI fuzz: random argument vectors over every subcommand, shape, hyperparameter and odd file.

Each run must end with exit code 0, 1 or 2, print no traceback and no "bug in convtool", and
stay under 1 GB of peak memory. The runs go to one worker subprocess (started once) that
invokes the CLI in-process and reports its peak resident memory after each run; the worker's
address space is capped at 4 GiB so a regression cannot take the machine down with it.

Values are either small (the run does real work quickly) or absurd (huge, negative, zero,
overflowing int64, not a number), never in between, so every run is either cheap or refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.cli_worker import PEAK_LIMIT, Worker


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}

    def npy(name: str, array: np.ndarray) -> None:
        np.save(root / name, array)
        out[name] = root / name

    npy("k1.npy", rng.standard_normal((2, 2, 3)).astype(np.float32))
    npy("k2.npy", rng.standard_normal((4, 2, 3, 3)).astype(np.float32))
    npy("k3.npy", rng.standard_normal((2, 2, 2, 2, 2)).astype(np.float32))
    npy("int.npy", np.arange(72, dtype=np.int32).reshape(4, 2, 3, 3))
    npy("big_endian.npy", rng.standard_normal((4, 2, 3, 3)).astype(">f4"))
    nan = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    nan[0, 0, 0, 0] = np.nan
    npy("nan.npy", nan)
    save_file({"weight": torch.ones(4, 2, 3, 3).to(torch.float8_e4m3fn)}, str(root / "f8.st"))
    (root / "f8.st").rename(root / "f8.safetensors")
    out["f8.safetensors"] = root / "f8.safetensors"
    (root / "empty.npy").write_bytes(b"")
    (root / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    (root / "text.safetensors").write_text("not tensors\n")
    (root / "kernel.txt").write_bytes((root / "k2.npy").read_bytes())  # right bytes, wrong name
    (root / "npy_as.pt").write_bytes((root / "k2.npy").read_bytes())
    (root / "folder.npy").mkdir()
    for name in ("empty.npy", "garbage.pt", "text.safetensors", "kernel.txt", "npy_as.pt"):
        out[name] = root / name
    out["folder.npy"] = root / "folder.npy"
    out["missing.npy"] = root / "missing.npy"
    out["_out"] = root / "out"
    out["_out"].mkdir()
    return out


@pytest.fixture(scope="module")
def worker(files: dict[str, Path]) -> Iterator[Worker]:
    w = Worker(files["_out"])
    yield w
    w.close()


SMALL = st.integers(1, 3)
ABSURD = st.sampled_from(
    ["0", "-1", "-99999999", "99999999999", "999999999999999", "9223372036854775807",
     "9223372036854775808", "99999999999999999999", "1e3", "abc", "3.5", "nan", "1,,2"]
)  # fmt: skip
# (absurd sizes are >= 1e11: one of them makes any tensor over it larger than any machine, so the
# run must be refused or stay analytic; 1e8 with small other sizes is a legitimate GB-sized run)


def value(draw: st.DrawFn, small: st.SearchStrategy[int] = SMALL) -> str:
    """Mostly a small int, one time in eight an absurd value."""
    return draw(ABSURD) if draw(st.integers(0, 7)) == 0 else str(draw(small))


@st.composite
def per_dim(draw: st.DrawFn, ndim: int) -> str:
    """An int or one value per dim (now and then the wrong number of them)."""
    n = draw(st.sampled_from([1, 1, 1, ndim, ndim, ndim, ndim + 1]))
    return ",".join(value(draw) for _ in range(n))


# kernel files: (name, spatial dims); all have 2 input channels
KERNELS = [("k1.npy", 1), ("k2.npy", 2), ("k3.npy", 3), ("int.npy", 2), ("big_endian.npy", 2)]
ODD = [
    "nan.npy", "f8.safetensors", "empty.npy", "garbage.pt", "text.safetensors", "kernel.txt",
    "npy_as.pt", "folder.npy", "missing.npy",
]  # fmt: skip


@st.composite
def shape(draw: st.DrawFn, ndim: int) -> str:
    if draw(st.integers(0, 5)) == 0:  # anything at all
        dims = draw(st.integers(0, 5))
        return ",".join(value(draw, st.integers(0, 12)) for _ in range(dims))
    spatial = [str(draw(st.integers(3, 9))) for _ in range(ndim)]
    if draw(st.integers(0, 3)) == 0:
        spatial[draw(st.integers(0, ndim - 1))] = draw(ABSURD)
    batch = ["1"] if draw(st.integers(0, 3)) == 0 else []
    return ",".join([*batch, "2", *spatial])


COMMANDS = {
    "toeplitz": [[], ["--json"], ["--sparse", "-o", "T.npz"], ["-o", "T.npy"]],
    "count-params": [[], ["--json"], ["--csv"]],
    "verify": [["--trials", "1"], ["--trials", "1", "--to", "toeplitz", "--dtype", "float32"]],
    "inspect": [[], ["--json"]],
    "convert": [["--to", "lc", "-o", "m.pt"], ["--to", "fc", "--sparse", "-o", "m.safetensors"]],
}
FLAGS = ["--stride", "--padding", "--dilation", "--groups", "--max-memory"]


@st.composite
def argv(draw: st.DrawFn, files: dict[str, Path]) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    if draw(st.integers(0, 4)):
        name, ndim = draw(st.sampled_from(KERNELS))
    else:
        name, ndim = draw(st.sampled_from(ODD)), 2
    args = [command, str(files[name])]
    if draw(st.integers(0, 7)):
        args += ["--input-shape", draw(shape(ndim))]
    for flag in draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True)):
        if flag == "--padding" and draw(st.integers(0, 3)) == 0:
            args += [flag, draw(st.sampled_from(["same", "valid", "SAME"]))]
        elif flag == "--groups":
            args += [flag, value(draw)]
        elif flag == "--max-memory":
            args += [flag, draw(st.sampled_from(["1", "64K", "8G", "8G", "8G", "-5", "lots"]))]
        else:
            args += [flag, draw(per_dim(ndim))]
    if draw(st.integers(0, 5)) == 0:
        args += ["--padding-mode", draw(st.sampled_from(["reflect", "replicate", "circular", "x"]))]
    if draw(st.integers(0, 7)) == 0:
        args.append("--transposed")
        if draw(st.booleans()):
            args += ["--output-padding", draw(per_dim(ndim))]
    args += draw(st.sampled_from(COMMANDS[command]))
    if "-o" in args:
        args.append("--force")
    return args


@given(data=st.data())
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same 60 argument vectors on every run: CI never flakes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_any_argument_vector_ends_cleanly(
    worker: Worker, files: dict[str, Path], data: st.DataObject
) -> None:
    args = data.draw(argv(files))
    result = worker.run(args)
    output = result["stdout"] + result["stderr"]
    event(f"{args[0]} exit {result['code']}")
    assert result["code"] in (0, 1, 2), (args, result)
    assert result["exception"] is None, (args, result)
    assert "Traceback" not in output, (args, output)
    assert "bug in convtool" not in output, (args, output)
    if result["code"] == 2:
        assert result["stderr"].startswith("convtool: error: "), (args, result)
        assert result["stderr"].count("\n") == 1, (args, result)
    # peak of this run (VmHWM reset before it where Linux allows; else the worker's high-water
    # mark so far, which bounds it too)
    assert result["peak"] < PEAK_LIMIT, (args, result["peak"])


def test_worker_measures_a_real_allocation(worker: Worker, files: dict[str, Path]) -> None:
    """The memory check can fail: a dense 1.2 GB matrix (24640 x 12320 float32) written to .pt
    shows up in the peak."""
    args = ["toeplitz", str(files["k2.npy"]), "-i", "2,70,88", "--padding", "1"]
    result = worker.run([*args, "-o", "T.pt", "--force"])
    assert result["code"] == 0, result
    if not result["reset"]:
        pytest.skip("this kernel cannot reset the peak RSS, so later runs could not be checked")
    assert result["peak"] > PEAK_LIMIT
