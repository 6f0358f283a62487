"""Library errors speak in parameters (`max_memory=`, `sparse=True`), never in CLI flags.

Each case calls the library (not the CLI) with bad input; every ConvtoolError message must be
free of `--flag` words. The CLI's one error mapper (`convtool.cli.flags.cli_message`) turns the
parameters back into flags; the last tests check that mapping.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import convtool
from convtool import describe, forms, matrix_output, resources
from convtool.errors import ConvtoolError
from convtool.inventory import select as select_layers
from convtool.io import checkpoints, matrix_files, writers
from convtool.matrices import matrix_info
from convtool.models import convert_with_report
from convtool.params import count_layers
from convtool.source import ConvFlags, SourceOptions, check_finite, load_source
from convtool.spec import ConvSpec
from tests.golden_models import make_long_names

FLAG = re.compile(r"(?<![\w-])--?[a-z][\w-]*")  # --max-memory, -o


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.ConvTranspose2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _kernel_file(tmp_path: Path, name: str = "k.npz", **arrays: Any) -> Path:
    path = tmp_path / name
    np.savez(
        path, **(arrays or {"a.weight": np.ones((3, 2, 3, 3)), "b.weight": np.ones((2, 2, 3, 3))})
    )
    return path


def _pickled(tmp_path: Path) -> Path:
    path = tmp_path / "module.pt"
    torch.save(nn.Conv2d(1, 1, 1), path)
    return path


def _export(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(nn.Conv2d(1, 1, 1), (torch.zeros(1, 1, 4, 4),)), path)
    return path


def _nonfinite() -> None:
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight[0] = float("nan")
    src = convtool.source.module_layers(conv)  # type: ignore[attr-defined]
    check_finite(src[0])


def _existing(tmp_path: Path) -> None:
    out = tmp_path / "exists.npy"
    out.write_bytes(b"x")
    writers.check_target(out, force=False)


def _kernel_source(p: Path) -> Any:
    path = p / "one.npy"
    np.save(path, np.ones((2, 3, 3, 3), dtype=np.float32))
    return load_source(path, SourceOptions())


def _model_source(p: Path) -> Any:
    torch.save(make_long_names().state_dict(), p / "net.pt")
    return load_source(p / "net.pt", SourceOptions(model="tests.golden_models:make_long_names"))


def _info() -> Any:
    return matrix_info(ConvSpec.from_module(nn.Conv2d(3, 4, 3)), (3, 16, 16), torch.float32)


class NeedsRate(nn.Module):
    """A forward that needs a keyword argument besides the input."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(1, 2, 3)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        return self.c(x) * sr


BIG = nn.Conv2d(64, 64, 3)  # its dense T on (64, 512, 512) is about 280 TB

CASES: dict[str, Callable[[Path], Any]] = {
    "convert to toeplitz": lambda p: convtool.convert_model(Net(), (1, 2, 5, 5), to="toeplitz"),
    "convert lc sparse": lambda p: convtool.convert_model(Net(), (1, 2, 5, 5), sparse=True),
    "convert transposed to lc": lambda p: convtool.convert_model(Net(), (1, 2, 5, 5), to="lc"),
    "convert memory": lambda p: convert_with_report(
        Net(), (1, 2, 5, 5), to="fc", memory_limit=10, layers="a"
    ),
    "convert bad shape": lambda p: convtool.convert_model(Net(), (1, 7, 5, 5), to="fc"),
    "convert layers empty": lambda p: convtool.convert_model(Net(), (1, 2, 5, 5), layers=" , "),
    "convert layers unmatched": lambda p: convtool.convert_model(Net(), (1, 2, 5, 5), layers="z"),
    "select layers": lambda p: select_layers(["a", "b"], "c*"),
    "lc of transposed": lambda p: convtool.to_locally_connected(
        nn.ConvTranspose2d(1, 1, 3), (1, 4, 4)
    ),
    "fc dense too big": lambda p: convtool.to_fully_connected(BIG, (64, 512, 512)),
    "toeplitz bad shape": lambda p: convtool.toeplitz(nn.Conv2d(2, 3, 3), (5, 7, 7)),
    "verify to": lambda p: convtool.verify(nn.Conv2d(1, 1, 3), (1, 5, 5), to="everything"),
    "verify rtol alone": lambda p: convtool.verify(nn.Conv2d(1, 1, 3), (1, 5, 5), rtol=1e-3),
    "verify trials": lambda p: convtool.verify(nn.Conv2d(1, 1, 3), (1, 5, 5), trials=-1),
    "verify dtype": lambda p: convtool.verify(nn.Conv2d(1, 1, 3), (1, 5, 5), dtype="int8"),
    "count layers unmatched": lambda p: convtool.count_params(Net(), (1, 2, 5, 5), layers="zz"),
    "count layers empty": lambda p: convtool.count_params(Net(), (1, 2, 5, 5), layers=","),
    "count bad shape": lambda p: convtool.count_params(nn.Conv2d(2, 3, 3), (4, 8, 8)),
    "count layers no names": lambda p: count_layers([], pattern="x"),
    "forms parse": lambda p: forms.parse("sideways", forms.ModelTarget),
    "size text": lambda p: resources.parse_size("lots"),
    "memory limit": lambda p: resources.check_memory(10, "x", "use sparse=True", limit=1),
    "matrix format dense for sparse": lambda p: matrix_files.matrix_format(p / "T.npy", True),
    "matrix format unknown": lambda p: matrix_files.matrix_format(p / "T.xyz", False),
    "existing output": _existing,
    "missing file": lambda p: load_source(p / "nope.npy", SourceOptions()),
    "several kernels": lambda p: load_source(_kernel_file(p), SourceOptions()),
    "single tensor with layer": lambda p: load_source(
        _kernel_file(p, "one.npz", weight=np.ones((1, 1, 3, 3))), SourceOptions(layer="x")
    ),
    "model kwargs alone": lambda p: load_source(_kernel_file(p), SourceOptions(model_kwargs="{}")),
    "model not module:callable": lambda p: checkpoints.import_model("nonsense"),
    "model missing module": lambda p: checkpoints.import_model("no_such_module_xyz:make"),
    "model kwargs not json": lambda p: checkpoints.import_model("torch.nn:Conv2d", "[1]"),
    "model kwargs bad call": lambda p: checkpoints.import_model("torch.nn:Conv2d", '{"x": 1}'),
    "pickled module": lambda p: load_source(_pickled(p), SourceOptions()),
    "export with model": lambda p: load_source(_export(p), SourceOptions(model="a:b")),
    "export with bias": lambda p: load_source(_export(p), SourceOptions(bias=p / "b.npy")),
    "export wrong layer": lambda p: load_source(_export(p), SourceOptions(layer="nope")),
    "kernel bad groups": lambda p: load_source(
        _kernel_file(p, "g.npz", weight=np.ones((3, 2, 3, 3))),
        SourceOptions(flags=ConvFlags(groups=2)),
    ),
    "nonfinite weights": lambda p: _nonfinite(),
    "kernel without input shape": lambda p: describe.layer_input_shape(
        src := _kernel_source(p), src.layers[0], None
    ),
    "kernel wrong input shape": lambda p: describe.inspect_source(_kernel_source(p), (5, 8, 8)),
    "model without input shape": lambda p: describe.layer_input_shape(
        src := _model_source(p), src.layers[0], None
    ),
    "model wrong input shape": lambda p: describe.count_shapes(_model_source(p), (1, 9, 8, 8)),
    "inspect unknown layer": lambda p: describe.inspect_source(_model_source(p), None, "nope"),
    "forward needs kwargs": lambda p: convtool.convert_model(NeedsRate(), (1, 1, 8)),
    "layer input shape without layer": lambda p: describe.count_shapes(
        _model_source(p), None, None, (4, 8, 8)
    ),
    "dense npy over budget": lambda p: matrix_output.check_budget(
        p / "T.npy", "dense", _info(), max_memory=10
    ),
    "dense pt over budget": lambda p: matrix_output.check_budget(
        p / "T.pt", "dense", _info(), max_memory=10
    ),
    "sparse over budget": lambda p: matrix_output.check_budget(
        p / "T.npz", "sparse", _info(), max_memory=10
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_library_messages_name_parameters_not_flags(case: str, tmp_path: Path) -> None:
    with pytest.raises(ConvtoolError) as info:
        CASES[case](tmp_path)
    message = str(info.value)
    assert message and "\n" not in message
    assert not FLAG.findall(message), f"{case}: {message}"
    assert set(info.value.params) <= set(re.findall(r"\w+", message)), (
        f"{case}: params {info.value.params} not in {message!r}"
    )


def test_parameter_hints_become_flags_in_the_cli() -> None:
    from convtool.cli.flags import cli_message

    exc = ConvtoolError(
        "T needs 9 GiB but `max_memory` is 1 GiB; use sparse=True or to='lc', or pick with "
        "`layers`; layer='NAME' or model='pkg.mod:make'; glob layers='features.*'",
        params=("max_memory", "force", "sparse", "to", "layer", "model", "layers"),
    )
    assert cli_message(exc) == (
        "T needs 9 GiB but --max-memory is 1 GiB; use --sparse or --to lc, or pick with "
        "--layers; --layer NAME or --model pkg.mod:make; glob --layers 'features.*' (--force)"
    )
    # parameters the CLI has no flag for, and ordinary words, stay as they are
    assert cli_message(ConvtoolError("rows=3 and to the left")) == "rows=3 and to the left"
    # library names that differ from the flag
    assert cli_message(
        ConvtoolError("`example_input` or memory_limit=1", params="memory_limit")
    ) == ("--input-shape or --max-memory 1")


def test_new_parameters_become_flags() -> None:
    from convtool.cli.flags import cli_message
    from convtool.inventory import RUN_PARAMS, run_failure

    text = run_failure(TypeError("forward() missing 1 required positional argument: 'sr'"), (1, 8))
    said = cli_message(ConvtoolError(text, params=RUN_PARAMS))
    assert "--forward-kwargs" in said and "--layer-input-shape" in said
    assert "--input-shape" in said and "forward_kwargs" not in said
    assert "layer_input_shape" not in said and "example_input" not in said
    exc = ConvtoolError(
        "`layer_input_shape` goes with layer='NAME' (that layer's input)",
        params=("layer_input_shape", "layer"),
    )
    assert cli_message(exc) == "--layer-input-shape goes with --layer NAME (that layer's input)"


def test_torch_wording_is_left_alone() -> None:
    from convtool.cli.flags import cli_message

    text = "Given groups=1, weight [3, 2]; Conv2d(1, 1, stride=(1, 1)) (is `example_input` ok?)"
    assert cli_message(ConvtoolError(text, params="example_input")) == text.replace(
        "`example_input`", "--input-shape"
    )
