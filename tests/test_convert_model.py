"""Whole-model conversion: the converted model must compute what the original computes.

The oracle is always the original model (eager, or loaded back by torch) on random inputs,
compared with torch.testing.assert_close's defaults for float32.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from convtool.converted import load_converted
from convtool.errors import ConvtoolError
from convtool.inventory import select as select_layers
from convtool.io import model_files
from convtool.models import (
    FunctionalConvWarning,
    convert_model,
    convert_with_report,
    export_converted,
)
from convtool.source import SourceOptions, load_source
from convtool.spec import is_conv
from tests import models_for_tests as mt

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mixed": (mt.make_mixed, mt.MIXED_INPUT),
    "transposed": (mt.make_transposed, mt.TRANSPOSED_INPUT),
    "volume": (mt.make_volume, mt.VOLUME_INPUT),
}
FORMS = [("lc", False), ("fc", False), ("fc", True)]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")


def inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn((3, *shape[1:]), generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("to", "sparse"), FORMS, ids=["lc", "fc-dense", "fc-sparse"])
@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_equals_original(case: str, to: str, sparse: bool) -> None:
    make, shape = CASES[case]
    model = make()
    before = snapshot(model)
    x = inputs(shape)
    expected = model(x)
    if to == "lc" and case == "transposed":
        with pytest.raises(ConvtoolError, match=r"'up' is a ConvTranspose2d.*to='fc'"):
            convert_model(model, shape, to=to)
        return
    converted = convert_model(model, shape, to=to, sparse=sparse)
    torch.testing.assert_close(converted(x), expected)
    # every conv call is computed by its form
    assert set(converted.input_shapes) == {n for n, m in model.named_modules() if is_conv(m)}
    # the original is untouched: same modules, same values
    assert all(isinstance(m, nn.Module) for m in model.modules())
    assert sum(is_conv(m) for m in model.modules()) >= 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_report_counts_parameters() -> None:
    model = mt.make_mixed()
    converted, report = convert_with_report(model, mt.MIXED_INPUT, to="lc")
    assert [c.name for c in report.layers] == ["stem", "features.0", "features.3", "seq"]
    stem = report.layers[0]
    assert stem.input_shape == (3, 12, 12) and stem.output_shape == (6, 6, 15)
    # LC: one 3x2 kernel (and bias) per output position
    assert stem.params_after == 6 * 6 * 15 * (3 * 3 * 2) + 6 * 6 * 15
    assert report.params_before == sum(t.numel() for t in model.state_dict().values())
    assert report.params_after == sum(t.numel() for t in converted.state_dict().values())


def test_functional_conv_with_a_parameter_weight_is_converted() -> None:
    model = mt.make_functional()
    x = torch.randn(2, 3, 8, 8)
    converted = convert_model(model, (1, 3, 8, 8), to="fc")
    torch.testing.assert_close(converted(x), model(x))
    assert set(converted.input_shapes) == {"conv", "F.conv2d#0"}


def test_shared_and_custom_convs_are_skipped_with_a_warning() -> None:
    model = mt.make_shared()
    with pytest.warns(FunctionalConvWarning, match="'conv'.*several input shapes"):
        converted = convert_model(model, (1, 2, 8, 8), to="lc")
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(converted(x), model(x))
    custom = mt.make_custom()
    # its forward applies a weight computed from its parameters: that call is converted with
    # the weight it applies, under the call's own name
    converted = convert_model(custom, (1, 2, 6, 6), to="fc")
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(converted(x), custom(x))
    assert set(converted.input_shapes) == {"std.F.conv2d#0", "plain"}


def test_layers_pattern() -> None:
    model = mt.make_mixed()
    converted = convert_model(model, mt.MIXED_INPUT, to="fc", layers="features.*,seq")
    assert set(converted.input_shapes) == {"features.0", "features.3", "seq"}
    x = inputs(mt.MIXED_INPUT)
    torch.testing.assert_close(converted(x), model(x))
    names = ["stem", "features.0", "features.3", "seq"]
    assert select_layers(names, "features.0, stem") == ["stem", "features.0"]
    with pytest.raises(ConvtoolError, match=r"'head' matches no conv layer.*stem, features.0"):
        select_layers(names, "stem,head")


def test_memory_is_checked_before_building() -> None:
    with pytest.raises(ConvtoolError, match=r"dense FC.*`memory_limit`.*sparse=True or to='lc'"):
        convert_with_report(mt.make_mixed(), mt.MIXED_INPUT, to="fc", memory_limit=1000)


def test_bad_arguments() -> None:
    with pytest.raises(ConvtoolError, match="'lc' or 'fc'"):
        convert_model(mt.make_mixed(), mt.MIXED_INPUT, to="toeplitz")
    with pytest.raises(ConvtoolError, match="sparse"):
        convert_model(mt.make_mixed(), mt.MIXED_INPUT, to="lc", sparse=True)
    with pytest.raises(ConvtoolError, match=r"running the model on an input of shape \(1, 5, 9\)"):
        convert_model(mt.make_mixed(), (1, 5, 9), to="lc")


# ---------------------------------------------------------------------------------- files
def _save_state(path: Path, model: nn.Module, to: str, sparse: bool) -> None:
    converted, report = convert_with_report(model, mt.MIXED_INPUT, to=to, sparse=sparse)
    meta = model_files.metadata(report.to_dict(), "test", "state_dict", version="test")
    model_files.write_state_dict(path, converted.state_dict(), meta)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(("to", "sparse"), FORMS, ids=["lc", "fc-dense", "fc-sparse"])
def test_state_dict_round_trip(tmp_path: Path, to: str, sparse: bool, suffix: str) -> None:
    model = mt.make_mixed()
    path = tmp_path / f"converted{suffix}"
    _save_state(path, model, to, sparse)
    if suffix == ".pt":  # plain data: loadable without running code
        assert torch.load(path, weights_only=True)["convtool"]["to"] == to
    rebuilt = load_converted(mt.Mixed(), path).eval()  # fresh, untrained architecture
    x = inputs(mt.MIXED_INPUT, seed=1)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_load_converted_refuses_a_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    _save_state(path, mt.make_mixed(), "lc", False)
    with pytest.raises(ConvtoolError, match=r"converts layer 'stem'.*architecture"):
        load_converted(mt.make_volume(), path)
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ConvtoolError, match="not a converted model"):
        load_converted(mt.make_mixed(), tmp_path / "plain.pt")


ISOLATED = textwrap.dedent(
    """
    import json, sys
    sys.modules["convtool"] = None  # any attempt to import convtool fails
    sys.modules["tests"] = None
    import torch
    cases = json.loads(sys.argv[1])
    for program, data in cases:
        saved = torch.load(data, weights_only=True)
        module = torch.export.load(program).module()
        torch.testing.assert_close(module(saved["x"]), saved["expected"])
        print("ok", program)
    """
)


def test_pt2_runs_without_convtool(tmp_path: Path) -> None:
    """Each .pt2 is loaded by torch alone, in an interpreter that cannot import convtool, and
    runs on a batch size other than the example's."""
    cases = []
    plan = [
        ("mixed", "lc", False),
        ("mixed", "fc", True),
        ("transposed", "fc", False),
        ("volume", "lc", False),
        ("volume", "fc", True),
    ]
    for case, to, sparse in plan:
        make, shape = CASES[case]
        model = make()
        converted = convert_model(model, shape, to=to, sparse=sparse)
        program = tmp_path / f"{case}-{to}-{sparse}.pt2"
        torch.export.save(export_converted(converted, shape), str(program))
        x = torch.randn((3, *shape[1:]))  # another batch size: the batch dim is dynamic
        data = tmp_path / f"{case}-{to}-{sparse}.data.pt"
        torch.save({"x": x, "expected": model(x).detach()}, data)
        cases.append((str(program), str(data)))
    result = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, json.dumps(cases)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok ") == len(plan)


# ---------------------------------------------------------------------------------- sources
def test_export_sources_convert_and_torchscript_is_refused_before_work(tmp_path: Path) -> None:
    model = mt.make_mixed()
    example = torch.zeros(mt.MIXED_INPUT)
    torch.export.save(torch.export.export(model, (example,)), str(tmp_path / "m.pt2"))
    torch.jit.script(model).save(str(tmp_path / "m.ts.pt"))
    x = torch.randn(mt.MIXED_INPUT)  # the program was exported for this shape only
    expected = model(x)
    src = load_source(tmp_path / "m.pt2", SourceOptions())
    assert src.model is not None
    converted = convert_model(src.model, mt.MIXED_INPUT, to="lc")
    torch.testing.assert_close(converted(x), expected)
    program = export_converted(converted, mt.MIXED_INPUT)
    torch.testing.assert_close(program.module()(x), expected)
    script = load_source(tmp_path / "m.ts.pt", SourceOptions())
    with pytest.raises(ConvtoolError, match=r"TorchScript module cannot be converted.*\.pt2"):
        convert_with_report(script.model, mt.MIXED_INPUT, to="fc", memory_limit=1)
