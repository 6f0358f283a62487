"""Hostile torch.export archives, non-regular files and termination signals.

The malicious archives are real `torch.export.save` archives with one member rewritten, one for
each way `torch.export.load` would unpickle (or dlopen) something. A control test proves the
material is live: plain `torch.export.load` runs the payload of the pickle variants.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.safety_helpers import COMMANDS, REPO, one_line_error, run

Members = dict[str, bytes]


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base_members(tmp_path_factory: pytest.TempPathFactory) -> Members:
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.ReLU())
    program = torch.export.export(model, (torch.zeros(1, 1, 8),))
    path = tmp_path_factory.mktemp("pt2") / "base.pt2"
    torch.export.save(program, path)
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _top(members: Members) -> str:
    return next(iter(members)).split("/", 1)[0]


def _evil_torch_save(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def _sample_inputs(m: Members, marker: Path) -> Members:
    m[f"{_top(m)}/data/sample_inputs/model.pt"] = _evil_torch_save(marker)
    return m


def _pickled_weight(m: Members, marker: Path) -> Members:
    top = _top(m)
    key = f"{top}/data/weights/model_weights_config.json"
    config = json.loads(m[key])
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    m[key] = json.dumps(config).encode()
    m[f"{top}/data/weights/{entry['path_name']}"] = _evil_torch_save(marker)
    return m


def _constant(prefix: str, payload: Callable[[Path], bytes], use_pickle: bool) -> Callable:  # type: ignore[type-arg]
    def make(m: Members, marker: Path) -> Members:
        top = _top(m)
        key = f"{top}/data/constants/model_constants_config.json"
        config = json.loads(m[key])
        config["config"]["evil"] = {
            "path_name": f"{prefix}0",
            "is_param": False,
            "use_pickle": use_pickle,
            "tensor_meta": None,
        }
        m[key] = json.dumps(config).encode()
        m[f"{top}/data/constants/{prefix}0"] = payload(marker)
        return m

    return make


def _raw_pickle(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(Payload(marker))


def _compiled_code(m: Members, marker: Path) -> Members:
    m[f"{_top(m)}/data/aotinductor/model/model.so"] = b"\x7fELF" + b"\0" * 64
    return m


def _legacy_layout(m: Members, marker: Path) -> Members:
    top = _top(m)
    m.pop(f"{top}/archive_format")
    m[f"{top}/serialized_state_dict.pt"] = _evil_torch_save(marker)
    return m


VARIANTS: dict[str, Callable[[Members, Path], Members]] = {
    "sample_inputs": _sample_inputs,
    "use_pickle_weight": _pickled_weight,
    "use_pickle_tensor_constant": _constant("tensor_", _evil_torch_save, True),
    "opaque_obj_constant": _constant("opaque_obj_", _raw_pickle, False),
    "custom_obj_constant": _constant("custom_obj_", _raw_pickle, False),
    "compiled_code": _compiled_code,
    "legacy_layout": _legacy_layout,
}


def _write(path: Path, members: Members) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_malicious_archive_never_runs(
    tmp_path: Path, base_members: Members, variant: str, suffix: str, command: str
) -> None:
    marker = tmp_path / "PWNED"
    evil = _write(tmp_path / f"evil{suffix}", VARIANTS[variant](dict(base_members), marker))
    extra = ["-o", tmp_path / "out.pt"] if command == "convert" else []
    result = run(command, evil, "--input-shape", "1,1,8", *COMMANDS[command], *extra)
    message = one_line_error(result)
    assert not marker.exists(), "the payload ran"
    assert evil.name in message and "--allow-pickle" in message
    if variant not in ("legacy_layout",):
        assert "member" in message  # names what was refused
    assert sorted(p.name for p in tmp_path.iterdir()) == [evil.name]


@pytest.mark.parametrize("variant", ["sample_inputs", "use_pickle_weight"])
def test_control_torch_export_load_runs_the_payload(
    tmp_path: Path, base_members: Members, variant: str
) -> None:
    """The test material is live: torch's own loader runs these payloads."""
    marker = tmp_path / "PWNED"
    evil = _write(tmp_path / "evil.pt2", VARIANTS[variant](dict(base_members), marker))
    code = f"import torch\ntry:\n    torch.export.load({str(evil)!r})\nexcept Exception:\n    pass"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=False)
    assert marker.exists()


def test_guard_fails_closed_without_the_member_checks(
    tmp_path: Path, base_members: Members
) -> None:
    """Even if the member checks missed a case, the load-time guard refuses to unpickle."""
    from convtool.io import export_archive

    marker = tmp_path / "PWNED"
    evil = _write(tmp_path / "evil.pt2", _pickled_weight(dict(base_members), marker))
    with pytest.raises(export_archive._Refused), export_archive._guard():
        torch.export.load(io.BytesIO(evil.read_bytes()))
    assert not marker.exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # restored


def test_clean_archive_loads_and_allow_pickle_is_the_opt_in(
    tmp_path: Path, base_members: Members
) -> None:
    clean = _write(tmp_path / "clean.pt2", dict(base_members))
    assert run("inspect", clean, "--json").exit_code == 0
    marker = tmp_path / "PWNED"
    evil = _write(tmp_path / "evil.pt2", _sample_inputs(dict(base_members), marker))
    run("inspect", evil, "--allow-pickle", "--json")
    assert marker.exists()  # the user's explicit choice: torch's loader ran


def test_damaged_archives_are_one_line(tmp_path: Path, base_members: Members) -> None:
    top = _top(base_members)
    cases = {
        "two_tops": {**base_members, "other/x": b"1"},
        "bad_config": {**base_members, f"{top}/data/weights/model_weights_config.json": b"{"},
        "truncated": None,
    }
    for name, members in cases.items():
        path = tmp_path / f"{name}.pt2"
        if members is None:
            _write(path, dict(base_members))
            path.write_bytes(path.read_bytes()[:300])
        else:
            _write(path, members)
        message = one_line_error(run("inspect", path))
        assert path.name in message


# ----------------------------------------------------------------------- non-regular files
@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".npy", ".safetensors", ".onnx"])
def test_fifo_is_refused_without_blocking(tmp_path: Path, suffix: str) -> None:
    fifo = tmp_path / f"x{suffix}"
    os.mkfifo(fifo)
    result = subprocess.run(
        [sys.executable, "-m", "convtool", "inspect", str(fifo)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2 and "FIFO" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_devices_are_refused_directly_and_through_symlinks(
    tmp_path: Path, device: str, suffix: str
) -> None:
    link = tmp_path / f"weights{suffix}"
    link.symlink_to(device)
    for path in (Path(device), link):
        for command in COMMANDS:
            out = tmp_path / ("out.onnx" if suffix == ".onnx" else "out.pt")
            extra = ["-o", out] if command == "convert" else []
            message = one_line_error(run(command, path, "-i", "1,1,8", *COMMANDS[command], *extra))
            assert "device" in message


def test_bias_file_that_is_a_device_is_refused(tmp_path: Path) -> None:
    kernel = tmp_path / "k.npy"
    import numpy as np

    np.save(kernel, np.ones((2, 1, 3), dtype=np.float32))
    message = one_line_error(run("toeplitz", kernel, "-i", "1,8", "--bias", "/dev/zero"))
    assert "device" in message


def test_output_onto_a_device_or_fifo_is_refused_even_with_force(tmp_path: Path) -> None:
    import numpy as np

    kernel = tmp_path / "k.npy"
    np.save(kernel, np.ones((2, 1, 3), dtype=np.float32))
    fifo = tmp_path / "out.npy"
    os.mkfifo(fifo)
    message = one_line_error(run("toeplitz", kernel, "-i", "1,8", "-o", fifo, "--force"))
    assert "regular file" in message
    assert fifo.exists() and not fifo.is_file()


# ----------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signal_removes_temporary_files(tmp_path: Path, signum: int) -> None:
    import numpy as np

    kernel = tmp_path / "k.npy"
    np.save(kernel, np.ones((16, 16, 3, 3), dtype=np.float32))
    target = tmp_path / "T.npy"
    # a 324 MiB dense matrix streamed in row blocks: long enough to be caught mid-write
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "convtool",
            "toeplitz",
            kernel,
            "-i",
            "16,24,24",
            "--padding",
            "1",
            "-o",
            target,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(tmp_path.glob(".T.npy.*")):
        if process.poll() is not None:
            break
        time.sleep(0.01)
    if process.poll() is not None:
        assert process.returncode == 0, process.communicate()[1]
        pytest.skip("the write finished before the signal could be sent")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1
    assert signal.Signals(signum).name in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.npy"]


# ----------------------------------------------------------------------- TorchScript code
class _SavesOnLoad(torch.nn.Module):
    """Its `__setstate__` (run by torch.jit.load) and its forward write a file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 2, 3)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.ops.aten.save([x], self.marker + ".forward")
        return self.conv(x)

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.conv.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        torch.ops.aten.save([state[0]], state[1])
        self.marker = state[1]
        self.training = state[2]


class _SavesInForward(torch.nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 2, 3)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.ops.aten.save([x], self.marker)
        return self.conv(x)


@pytest.mark.parametrize("module", [_SavesOnLoad, _SavesInForward])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_torchscript_that_writes_files_is_refused(
    tmp_path: Path, module: type, command: str
) -> None:
    marker = tmp_path / "WRITTEN"
    evil = tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(module(str(marker))), evil)
    extra = ["-o", tmp_path / "out.pt2"] if command == "convert" else []
    message = one_line_error(run(command, evil, "-i", "1,1,8", *COMMANDS[command], *extra))
    assert "torch.save" in message and "--allow-pickle" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_control_torch_jit_load_writes_the_file(tmp_path: Path) -> None:
    """The material is live: torch.jit.load itself runs `__setstate__`."""
    marker = tmp_path / "WRITTEN"
    evil = tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(_SavesOnLoad(str(marker))), evil)
    marker.unlink(missing_ok=True)
    with pytest.raises(RuntimeError):  # after __setstate__ ran: this toy leaves `conv` unset
        torch.jit.load(evil)
    assert marker.exists()


def test_loaded_graph_audits_catch_what_a_text_scan_might_miss(tmp_path: Path) -> None:
    from convtool.errors import ConvtoolError
    from convtool.io.untrusted_ops import audit_program, audit_script_module

    scripted = torch.jit.script(_SavesInForward(str(tmp_path / "x")))
    with pytest.raises(ConvtoolError, match="aten::save"):
        audit_script_module(scripted, tmp_path / "m.pt")
    audit_script_module(torch.jit.script(torch.nn.Conv1d(1, 2, 3)), tmp_path / "ok.pt")

    program = torch.export.export(torch.nn.Conv1d(1, 2, 3), (torch.zeros(1, 1, 8),))
    audit_program(program, tmp_path / "ok.pt2")
    graph = program.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        graph.call_function(torch.ops.aten.save.default, ([], str(tmp_path / "y")))
    with pytest.raises(ConvtoolError, match="aten::save"):
        audit_program(program, tmp_path / "m.pt2")
