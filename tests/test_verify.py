"""convtool.verification against independent oracles: torch.testing.assert_close for the comparison
arithmetic, and torch's own convs (via verify's oracle) for every form; wrong candidates fail."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import convtool.verification as cv
from convtool import ConvtoolError
from convtool.matrices import bias_vector, toeplitz
from convtool.source import ConvLayer
from convtool.spec import ConvSpec
from convtool.verification import compare, verify
from tests.verify_models import EXAMPLE_SHAPE, make_model

FORMS = ("toeplitz_dense", "toeplitz_sparse", "lc", "fc_dense", "fc_sparse")


def assert_close_passes(expected: Tensor, actual: Tensor, rtol: float, atol: float) -> bool:
    """The oracle for `Comparison.passed`."""
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------------------------- compare()
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(finite, finite), min_size=1, max_size=40),
    st.floats(0, 1e-2),
    st.floats(0, 1e-2),
)
def test_compare_agrees_with_assert_close(
    pairs: list[tuple[float, float]], rtol: float, atol: float
) -> None:
    e = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    # actual = expected plus small noise, so both verdicts occur
    a = e + torch.tensor([(p[1] % 1) * 1e-3 for p in pairs], dtype=torch.float64)
    result = compare(e, a, rtol=rtol, atol=atol)
    assert result.passed == assert_close_passes(e, a, rtol, atol)
    assert bool(result) == result.passed
    diff = (a - e).abs()
    assert result.max_abs_error == pytest.approx(float(diff.max()), abs=0)
    assert result.mean_abs_error == pytest.approx(float(diff.mean()))
    assert result.mismatches == int((diff > atol + rtol * e.abs()).sum())


@settings(max_examples=30, deadline=None)
@given(st.lists(finite, min_size=2, max_size=30), st.integers(0, 10**6))
def test_max_errors_are_the_tightest_tolerances(values: list[float], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    e = torch.tensor(values, dtype=torch.float64) + 1.5  # some non-zero expected values
    e[e == 0] = 1.0
    a = e + torch.randn(e.shape, generator=g, dtype=torch.float64) * 1e-6
    r = compare(e, a)
    # the max abs error passes at rtol=0, anything smaller fails (when there is an error)
    assert assert_close_passes(e, a, rtol=0, atol=r.tightest_atol)
    if r.max_abs_error > 0:
        assert not assert_close_passes(e, a, rtol=0, atol=r.max_abs_error * (1 - 1e-6))
    # the max rel error passes at atol=0 (up to one rounding of the product)
    assert assert_close_passes(e, a, rtol=r.tightest_rtol * (1 + 1e-12), atol=0)
    if r.max_rel_error > 0:
        assert not assert_close_passes(e, a, rtol=r.max_rel_error * (1 - 1e-6), atol=0)
    # atol_needed is the tightest atol at the rtol used
    assert assert_close_passes(e, a, rtol=r.rtol, atol=r.atol_needed * (1 + 1e-12))
    if r.atol_needed > 0:
        assert not assert_close_passes(e, a, rtol=r.rtol, atol=r.atol_needed * (1 - 1e-6))


def test_default_tolerances_are_torch_testings() -> None:
    e = torch.zeros(3, dtype=torch.float32)
    r32 = compare(e, e)
    assert (r32.rtol, r32.atol) == (1.3e-6, 1e-5)
    assert "float32" in r32.tolerance_source
    r64 = compare(e.double(), e.double())
    assert (r64.rtol, r64.atol) == (1e-7, 1e-7)
    # just above / below the float32 default atol, at expected == 0
    assert compare(e, e + 0.9e-5).passed
    assert not compare(e, e + 1.1e-5).passed
    user = compare(e, e, rtol=0.5, atol=0.25)
    assert (user.rtol, user.atol, user.tolerance_source) == (0.5, 0.25, "user")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["expected", "actual", "both"])
def test_nonfinite_is_never_a_pass(bad: float, where: str) -> None:
    e = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    a = e.clone()
    if where in ("expected", "both"):
        e[1, 2] = bad
    if where in ("actual", "both"):
        a[1, 2] = bad
    r = compare(e, a, rtol=1.0, atol=1e9)
    assert not r.passed
    assert r.nonfinite == 1 and r.mismatches == 1
    assert r.max_abs_error == math.inf and r.max_rel_error == math.inf
    assert r.worst_index == (1, 2)
    assert r.mean_abs_error == 0.0  # the finite part agrees
    d = r.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON: inf becomes null
    assert d["max_abs_error"] is None and d["nonfinite"] == 1


def test_shape_mismatch_fails() -> None:
    r = compare(torch.zeros(2, 3), torch.zeros(3, 2))
    assert not r.passed and "shape mismatch" in r.note


def test_relative_error_at_zero_expected() -> None:
    r = compare(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 2.5]), rtol=0.3, atol=0)
    assert r.passed and r.max_rel_error == 0.25
    r = compare(torch.tensor([0.0, 2.0]), torch.tensor([1e-9, 2.0]), rtol=0.3, atol=0)
    assert not r.passed and r.max_rel_error == math.inf and r.worst_index == (0,)


def test_compare_catches_one_perturbed_matrix_entry() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect").double()
    shape = (3, 7, 8)
    x = torch.randn(5, *shape, dtype=torch.float64)
    expected = conv(x).detach().reshape(5, -1)
    t = toeplitz(conv, shape)
    b = bias_vector(conv, shape)
    assert compare(expected, x.reshape(5, -1) @ t.T + b).passed
    rows, cols = torch.nonzero(t, as_tuple=True)
    t_bad = t.clone()
    t_bad[rows[7], cols[7]] += 1e-6
    r = compare(expected, x.reshape(5, -1) @ t_bad.T + b)
    assert not r.passed
    assert r.worst_index is not None and r.worst_index[1] == int(rows[7])
    assert 1e-8 < r.max_abs_error < 1e-4


# ---------------------------------------------------------------------------------- verify()
LAYERS = [
    pytest.param(lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (4, 13),
                 id="conv1d"),
    pytest.param(lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1,
                                   padding_mode="reflect"), (3, 7, 6), id="conv2d-reflect"),
    pytest.param(lambda: nn.Conv2d(4, 4, 3, padding="same", dilation=(1, 2), groups=4,
                                   padding_mode="circular", bias=False), (4, 6, 7),
                 id="conv2d-depthwise-circular"),
    pytest.param(lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1,
                                   padding_mode="replicate"), (2, 3, 4, 3), id="conv3d"),
    pytest.param(lambda: nn.ConvTranspose1d(4, 6, 3, stride=3, padding=1, dilation=2,
                                            output_padding=1, groups=2), (4, 5),
                 id="convtranspose1d"),
    pytest.param(lambda: nn.ConvTranspose2d(2, 3, (2, 3), stride=2, padding=(0, 1),
                                            output_padding=(1, 0)), (2, 4, 3),
                 id="convtranspose2d"),
    pytest.param(lambda: nn.ConvTranspose3d(4, 2, 2, stride=(2, 1, 1), groups=2), (4, 2, 3, 2),
                 id="convtranspose3d"),
]  # fmt: skip


def _by_form(report: cv.VerifyReport) -> dict[str, cv.FormCheck]:
    return {c.form: c for c in report.checks}


@pytest.mark.parametrize(("make", "shape"), LAYERS)
def test_every_form_at_rounding_level_in_float64(make: Any, shape: tuple[int, ...]) -> None:
    pytest.importorskip("convtool.convert")
    torch.manual_seed(1)
    layer = make()
    report = verify(layer, shape, dtype=torch.float64, trials=2, seed=3)
    assert report.passed, [(c.form, c.status, c.note) for c in report.checks]
    checks = _by_form(report)
    assert tuple(checks) == FORMS
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    for form, check in checks.items():
        if form == "lc" and transposed:
            assert check.status == "not applicable" and check.comparison is None
            continue
        assert check.status == "passed", (form, check.note)
        assert check.comparison is not None
        assert check.comparison.max_abs_error <= 1e-10, form
        assert check.comparison.numel == 4 * math.prod(check.output_shape)  # 2 random + 2


@pytest.mark.parametrize(("make", "shape"), LAYERS[1:6:2])
def test_float32_within_default_tolerances(make: Any, shape: tuple[int, ...]) -> None:
    pytest.importorskip("convtool.convert")
    torch.manual_seed(2)
    report = verify(make(), shape, dtype="float32")
    assert report.passed
    assert report.tolerance.arithmetic and report.tolerance.source.startswith("float32 rounding")
    for check in report.checks:
        if check.comparison is not None:
            assert check.comparison.max_abs_error < 1e-5
            assert check.comparison.bound_ratio is not None
            assert 0 <= check.comparison.bound_ratio <= 1
            assert check.comparison.max_abs_error > 0 or check.form == "lc"


def test_toeplitz_only_runs_without_converters() -> None:
    report = verify(nn.Conv2d(2, 3, 3), (2, 5, 5), to="toeplitz", trials=1)
    assert report.passed and [c.form for c in report.checks] == list(FORMS[:2])
    assert report.inputs == ["random 0", "ones", "zeros"]


def test_inputs_are_seeded_and_include_ones_and_zeros() -> None:
    x = cv.make_inputs((2, 3), 2, 5, torch.float64)
    assert torch.equal(x, cv.make_inputs((2, 3), 2, 5, torch.float64))
    assert not torch.equal(x[:2], cv.make_inputs((2, 3), 2, 6, torch.float64)[:2])
    assert torch.equal(x[2], torch.ones(2, 3)) and torch.equal(x[3], torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("layer", "shape", "what"),
    [
        (nn.Conv2d(4, 32, 3, padding=2, padding_mode="reflect", stride=2, groups=2), (4, 9, 10),
         "output channels"),
        (nn.ConvTranspose2d(32, 6, 3, stride=2, groups=2, output_padding=1), (32, 5, 6),
         "input channels"),
    ],
)  # fmt: skip
def test_sampled_rows_when_sparse_is_too_big(layer: nn.Module, shape: Any, what: str) -> None:
    report = verify(layer, shape, to="toeplitz", max_memory=400_000)
    dense, sampled = report.checks
    assert dense.status == "skipped" and "budget" in dense.note
    assert sampled.form == "toeplitz_sampled" and sampled.status == "passed"
    assert what in sampled.note and "sparse T needs" in sampled.note
    assert sampled.comparison is not None and sampled.comparison.max_abs_error < 1e-12
    assert report.passed


def test_nothing_compared_is_an_error_not_a_pass() -> None:
    with pytest.raises(ConvtoolError, match=r"nothing was compared: .*needs .* > the memory budg"):
        verify(nn.Conv2d(2, 3, 3), (2, 5, 5), to="toeplitz", max_memory=100)


def test_strict_fails_on_a_sampled_check() -> None:
    layer, shape = nn.Conv2d(4, 32, 3, padding=2, stride=2, groups=2), (4, 9, 10)
    lenient = verify(layer, shape, to="toeplitz", max_memory=400_000)
    strict = verify(layer, shape, to="toeplitz", max_memory=400_000, strict=True)
    assert lenient.passed and not strict.passed and not strict.failures
    assert [c.form for c in strict.unchecked] == ["toeplitz_dense", "toeplitz_sampled"]
    assert strict.unchecked[1].partial.startswith("only the rows of ")
    assert strict.to_dict()["summary"]["partial"] == 1


# ------------------------------------------------------------------------------ wrong candidates
def test_perturbed_matrix_entry_fails_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cv.dense_row_blocks

    def perturbed(*args: Any, **kwargs: Any) -> Any:
        for r0, block in real(*args, **kwargs):
            if r0 <= 3 < r0 + block.shape[0]:
                row = block[3 - r0]
                row[int(torch.nonzero(row)[0, 0])] += 1e-6
            yield r0, block

    monkeypatch.setattr(cv, "dense_row_blocks", perturbed)
    report = verify(nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5), to="toeplitz")
    checks = _by_form(report)
    assert checks["toeplitz_dense"].status == "failed"
    assert checks["toeplitz_sparse"].status == "passed"
    assert not report.passed and report.failures == [checks["toeplitz_dense"]]


def test_shifted_kernel_fails_sampled_check(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cv.coo_entries

    def shifted(spec: ConvSpec, weight: Tensor, *args: Any) -> Any:
        return real(spec, torch.roll(weight, 1, dims=-1), *args)

    monkeypatch.setattr(cv, "coo_entries", shifted)
    layer = nn.Conv2d(4, 32, 3, padding=2, stride=2, groups=2)
    report = verify(layer, (4, 9, 10), to="toeplitz", max_memory=400_000)
    assert report.checks[1].form == "toeplitz_sampled"
    assert report.checks[1].status == "failed"


def test_shifted_kernel_fc_candidate_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    convert = pytest.importorskip("convtool.convert")
    real = convert.to_fully_connected

    def shifted(conv: nn.Module, shape: Any, **kwargs: Any) -> nn.Module:
        wrong = cv.conv_module(
            ConvSpec.from_module(conv), torch.roll(conv.weight, 1, dims=-1), conv.bias
        )
        return real(wrong, shape, **kwargs)

    monkeypatch.setattr(convert, "to_fully_connected", shifted)
    report = verify(nn.Conv1d(2, 3, 3), (2, 9), to="fc")
    assert [c.status for c in report.checks] == ["failed", "failed"]
    assert not report


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_nan_weight_is_a_failed_comparison(where: str) -> None:
    layer = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        getattr(layer, where).view(-1)[1] = math.nan
    report = verify(layer, (2, 5, 5), to="toeplitz")
    assert not report.passed
    for check in report.checks:
        assert check.status == "failed" and check.comparison is not None
        assert check.comparison.nonfinite > 0
        assert f"1 in the {where}" in check.note
    json.dumps(report.to_dict(), allow_nan=False)


def test_nan_weight_fails_every_form() -> None:
    pytest.importorskip("convtool.convert")
    layer = nn.Conv1d(2, 3, 3)
    with torch.no_grad():
        layer.weight[0, 0, 0] = math.nan
    report = verify(layer, (2, 6))
    assert [c.status for c in report.checks] == ["failed"] * 5


# ---------------------------------------------------------------------------------- a model
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_per_layer_and_end_to_end(dtype: torch.dtype) -> None:
    pytest.importorskip("convtool.convert")
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = verify(model, EXAMPLE_SHAPE, dtype=dtype, trials=2)
    assert report.passed, [(c.name, c.form, c.note) for c in report.all_checks if not c.passed]
    assert {c.name for c in report.checks} == {"conv1", "conv2", "conv3"}
    assert len(report.checks) == 3 * len(FORMS)
    e2e = {c.form: c for c in report.end_to_end}
    assert set(e2e) == {"lc", "fc_dense", "fc_sparse"}
    for check in e2e.values():
        assert check.status == "passed" and "3 conv(s) converted" in check.note
        assert check.comparison is not None
        if dtype == torch.float64:
            assert check.comparison.max_abs_error <= 1e-10
    conv3 = next(c for c in report.checks if c.name == "conv3")
    assert conv3.input_shape == (8, 36)  # seen after the reshape
    for k, v in model.state_dict().items():  # the model passed in is untouched
        assert torch.equal(v, before[k]) and v.dtype == torch.float32


def test_model_with_transposed_conv_and_layer_pattern() -> None:
    pytest.importorskip("convtool.convert")
    report = verify(make_model(transposed=True), EXAMPLE_SHAPE, layers="conv3,up", trials=1)
    assert report.passed
    assert {c.name for c in report.checks} == {"conv3", "up"}
    lc = {c.name: c for c in report.checks if c.form == "lc"}
    assert lc["up"].status == "not applicable" and lc["conv3"].status == "passed"
    e2e = {c.form: c for c in report.end_to_end}
    assert e2e["lc"].status == "passed" and "kept: up" in e2e["lc"].note
    assert "1 conv(s) converted" in e2e["lc"].note
    assert "2 conv(s) converted" in e2e["fc_dense"].note


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_end_to_end_catches_a_wrong_conversion(
    monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    convert = pytest.importorskip("convtool.convert")
    real = convert.to_locally_connected

    def wrong(conv: nn.Module, shape: Any) -> nn.Module:
        module = real(conv, shape)
        with torch.no_grad():
            next(p for p in module.parameters() if p.dim() > 1).view(-1)[0] += 1e-3
        return module

    monkeypatch.setattr(convert, "to_locally_connected", wrong)
    report = verify(make_model(), EXAMPLE_SHAPE, to="lc", trials=1, dtype=dtype)
    assert not report.passed
    assert report.end_to_end[0].status == "failed"
    cmp = report.end_to_end[0].comparison
    assert cmp is not None and (dtype == "float64" or cmp.bound_ratio > 1)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rtol=1e-3), "`rtol` was given without `atol`"),
        (dict(atol=-1.0, rtol=0.0), "atol must be a finite non-negative"),
        (dict(dtype="float16"), "dtype must be float32 or float64"),
        (dict(to="bogus"), "`to` must be .toeplitz., .lc., .fc. or .all."),
        (dict(trials=-1), "trials must be a non-negative int"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConvtoolError, match=message):
        verify(nn.Conv1d(2, 2, 3), (2, 8), **kwargs)


def test_bad_input_shape_is_an_error_not_a_failure() -> None:
    with pytest.raises(ConvtoolError, match="expects 2 input channels"):
        verify(nn.Conv1d(2, 2, 3), (3, 8))
    with pytest.raises(ConvtoolError, match="takes a conv layer"):
        verify(torch.zeros(3), (3,))  # type: ignore[arg-type]


def test_conv_layer_record_and_json() -> None:
    spec = ConvSpec.from_weight((3, 2, 3), stride=2, bias=True)
    layer = ConvLayer("k", spec, torch.randn(3, 2, 3), torch.randn(3))
    report = verify(layer, (2, 11), to="toeplitz", dtype="float32")
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is True and data["dtype"] == "float32"
    assert data["end_to_end"] is None
    entry = data["layers"][0]
    for key in ("name", "form", "max_abs_error", "max_rel_error", "passed"):
        assert key in entry
    assert entry["name"] == "k" and entry["tolerance_source"].startswith("float32 rounding")
    assert 0 <= entry["bound_ratio"] <= 1
