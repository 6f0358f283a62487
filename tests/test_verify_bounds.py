"""verify's default tolerance (the rounding-error bound): long dot products pass in float32 for
every form, real errors (1e-3 relative in one kernel entry, a shifted kernel, a wrong padding
mode, a NaN) fail every form, float64 stays within a few ulp; calls at several sizes.

The candidates are made wrong by patching the builders verify calls, so the reference (torch's
own conv in float64) is untouched: a test that could not fail would pass here too."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import convtool.convert as convert
import convtool.verification as cv
from convtool.error_bounds import conv_bound_terms, dot_length, elementwise_bound, unit_roundoff
from convtool.spec import ConvSpec, build_conv
from convtool.verification import verify

FORMS = ("toeplitz_dense", "toeplitz_sparse", "lc", "fc_dense", "fc_sparse")

Change = Callable[[ConvSpec, Tensor], tuple[ConvSpec, Tensor]]


@contextmanager
def wrong_candidates(monkeypatch: pytest.MonkeyPatch, change: Change) -> Iterator[None]:
    """Every form verify builds (T dense in blocks, T sparse, sampled rows, LC, FC) gets
    `change(spec, weight)` instead of the layer's own spec and weight."""
    real_matrix, real_blocks, real_coo = cv.matrix, cv.dense_row_blocks, cv.coo_entries
    real_lc, real_fc = convert.to_locally_connected, convert.to_fully_connected

    def matrix(spec: ConvSpec, weight: Tensor, *args: Any, **kwargs: Any) -> Any:
        return real_matrix(*change(spec, weight), *args, **kwargs)

    def blocks(spec: ConvSpec, weight: Tensor, *args: Any, **kwargs: Any) -> Any:
        return real_blocks(*change(spec, weight), *args, **kwargs)

    def coo(spec: ConvSpec, weight: Tensor, *args: Any, **kwargs: Any) -> Any:
        return real_coo(*change(spec, weight), *args, **kwargs)

    def module(conv: nn.Module) -> nn.Module:
        spec, weight = change(ConvSpec.from_module(conv), conv.weight.detach())
        return build_conv(spec, weight, None if conv.bias is None else conv.bias.detach())

    monkeypatch.setattr(cv, "matrix", matrix)
    monkeypatch.setattr(cv, "dense_row_blocks", blocks)
    monkeypatch.setattr(cv, "coo_entries", coo)
    monkeypatch.setattr(convert, "to_locally_connected", lambda c, s: real_lc(module(c), s))
    monkeypatch.setattr(
        convert, "to_fully_connected", lambda c, s, **kw: real_fc(module(c), s, **kw)
    )
    yield


def _by_form(report: cv.VerifyReport) -> dict[str, cv.FormCheck]:
    return {c.form: c for c in report.checks}


# ------------------------------------------------------------------------- long dot products
@pytest.mark.parametrize(
    ("make", "shape", "n"),
    [
        (lambda: nn.Conv2d(1024, 4, (64, 1)), (1024, 64, 2), 65_536),
        (lambda: nn.Conv2d(256, 3, (4, 4), padding=1, padding_mode="reflect"), (256, 5, 5), 4096),
        (lambda: nn.Conv1d(512, 2, 32, padding=8, padding_mode="circular"), (512, 40), 16_384),
        (lambda: nn.ConvTranspose2d(1024, 2, (8, 2), stride=2), (1024, 2, 2), 16_384),
    ],
    ids=["64x1-over-1024ch", "4x4-over-256ch-reflect", "1d-circular", "transposed"],
)
def test_long_dot_products_pass_in_float32_for_every_form(
    make: Callable[[], nn.Module], shape: tuple[int, ...], n: int
) -> None:
    torch.manual_seed(0)
    layer = make()
    assert dot_length(ConvSpec.from_module(layer)) == n
    report = verify(layer, shape, dtype="float32", trials=2)
    assert report.passed, [(c.form, c.status, c.note) for c in report.checks]
    assert report.tolerance.arithmetic and "rounding bound" in report.tolerance.source
    transposed = isinstance(layer, nn.ConvTranspose2d)
    for check in report.checks:
        if check.form == "lc" and transposed:
            assert check.status == "not applicable"
            continue
        c = check.comparison
        assert c is not None and c.bound_ratio is not None
        # the old fixed tolerance (torch.testing's float32 defaults) may not hold: the real
        # error is rounding, and the bound leaves room for every summation order
        assert 0 < c.bound_ratio < 0.5, (check.form, c.bound_ratio)
        assert c.max_abs_error > 0 or check.form == "lc"


def test_the_bound_is_no_looser_than_needed_for_short_products() -> None:
    """A 3x3 single-channel conv (9 terms): the bound is a few float32 ulps of sum |w||x|."""
    conv = nn.Conv2d(1, 1, 3)
    x = torch.randn(3, 1, 6, 6)
    terms = conv_bound_terms(ConvSpec.from_module(conv), conv.weight, conv.bias, x)
    bound = elementwise_bound(terms, torch.float32, torch.ones(3, dtype=torch.bool))
    ulps = bound / (unit_roundoff(torch.float32) * terms.abs_sum)
    assert float(ulps.max()) < 6 * math.sqrt(11) + 1e-6


# ------------------------------------------------------------------------------ wrong forms
def _bump(spec: ConvSpec, w: Tensor) -> tuple[ConvSpec, Tensor]:
    """One kernel entry (the largest) changed by 1e-3 relative."""
    w = w.clone()
    w.view(-1)[int(w.abs().argmax())] *= 1 + 1e-3
    return spec, w


def _shift(spec: ConvSpec, w: Tensor) -> tuple[ConvSpec, Tensor]:
    return spec, torch.roll(w, 1, dims=-1)


def _nan(spec: ConvSpec, w: Tensor) -> tuple[ConvSpec, Tensor]:
    w = w.clone()
    w.view(-1)[5] = math.nan
    return spec, w


def _padding_mode(spec: ConvSpec, w: Tensor) -> tuple[ConvSpec, Tensor]:
    other = "zeros" if spec.padding_mode != "zeros" else "replicate"
    return ConvSpec.from_module(_with_mode(spec, w, other)), w


def _with_mode(spec: ConvSpec, w: Tensor, mode: str) -> nn.Module:
    conv = build_conv(spec, w, None)
    conv.padding_mode = mode
    return conv


@pytest.mark.parametrize("change", [_bump, _shift, _nan, _padding_mode],
                         ids=["entry+1e-3", "shifted", "nan", "padding-mode"])  # fmt: skip
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), (1, 6, 6)),  # n = 9
        (lambda: nn.Conv2d(16, 3, 3, padding=1), (16, 5, 5)),  # n = 144
        (lambda: nn.Conv2d(64, 2, 3, padding=1, padding_mode="circular"), (64, 4, 4)),  # 576
    ],
    ids=["n9", "n144", "n576"],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_real_errors_fail_every_form(
    monkeypatch: pytest.MonkeyPatch,
    change: Change,
    make: Callable[[], nn.Module],
    shape: tuple[int, ...],
    dtype: str,
) -> None:
    torch.manual_seed(1)
    layer = make()
    assert verify(layer, shape, dtype=dtype, trials=2).passed  # the real forms pass
    with wrong_candidates(monkeypatch, change):
        report = verify(layer, shape, dtype=dtype, trials=2)
    assert not report.passed
    statuses = {c.form: c.status for c in report.checks}
    assert statuses == dict.fromkeys(FORMS, "failed"), statuses


def test_wrong_forms_fail_the_sampled_check_too(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = nn.Conv2d(4, 32, 3, padding=2, stride=2, groups=2)
    with wrong_candidates(monkeypatch, _shift):
        report = verify(layer, (4, 9, 10), to="toeplitz", dtype="float32", max_memory=400_000)
    sampled = report.checks[1]
    assert sampled.form == "toeplitz_sampled" and sampled.status == "failed"


# ---------------------------------------------------------------------------------- float64
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"), (8, 7, 6)),
        (lambda: nn.Conv3d(4, 2, 2, stride=(2, 1, 1), groups=2), (4, 4, 3, 3)),
        (lambda: nn.ConvTranspose1d(6, 4, 3, stride=2, groups=2), (6, 9)),
        (lambda: nn.Conv1d(256, 2, 16, padding=4, padding_mode="circular"), (256, 20)),
    ],
    ids=["reflect", "conv3d-groups", "transposed", "4096-terms"],
)
def test_float64_within_a_few_ulp(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    """|form - reference| <= 4 ulp of the output's scale (sum |w||x| + |b| of each element)."""
    torch.manual_seed(3)
    layer = make().double()
    report = verify(layer, shape, dtype="float64", trials=2)
    assert report.passed
    spec = ConvSpec.from_module(layer)
    x = cv.make_inputs(spec.sample_shape(shape), 2, 0, torch.float64)
    scale = conv_bound_terms(spec, layer.weight, layer.bias, x).abs_sum.max()
    ulp = float(scale) * torch.finfo(torch.float64).eps
    for check in report.checks:
        if check.comparison is not None:
            assert check.comparison.max_abs_error <= 4 * ulp, (check.form, check.comparison)


# -------------------------------------------------------------------- calls at several sizes
class TwoSizes(nn.Module):
    """One conv applied to the input and to its 2x-pooled copy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        small = self.conv(nn.functional.avg_pool2d(x, 2))
        big = self.conv(x)
        return self.head(big + nn.functional.interpolate(small, scale_factor=2.0))


def make_two_sizes() -> nn.Module:
    torch.manual_seed(0)
    return TwoSizes()


def test_conv_called_at_two_sizes_is_checked_at_each() -> None:
    report = verify(make_two_sizes(), (1, 2, 8, 8), layers="conv", to="toeplitz", trials=1)
    assert report.passed
    assert {c.input_shape for c in report.checks} == {(2, 8, 8), (2, 4, 4)}
    assert any("2 input shapes" in n for n in report.notes)


def test_whole_model_with_a_conv_at_two_sizes_leaves_it_unconverted_end_to_end() -> None:
    report = verify(make_two_sizes(), (1, 2, 8, 8), to="fc", dtype="float32", trials=1)
    assert report.passed
    assert len([c for c in report.checks if c.name == "conv"]) == 4
    e2e = report.end_to_end[0]
    assert "1 conv(s) converted" in e2e.note and "several shapes" in e2e.note


def test_max_memory_zero_compares_nothing_and_says_why() -> None:
    with pytest.raises(cv.ConvtoolError, match=r"nothing was compared: .*memory budget of 0 B"):
        verify(nn.Conv2d(2, 3, 3), (2, 5, 5), max_memory=0)


# ------------------------------------------------------------------ end to end, memory budget
def test_end_to_end_needs_one_form_at_a_time_not_their_sum() -> None:
    from tests.verify_models import EXAMPLE_SHAPE, make_model

    # dense T (float64): conv1 972 KiB, conv2 648 KiB, conv3 162 KiB; sum 1.7 MiB
    fits_each = verify(make_model(), EXAMPLE_SHAPE, to="fc", trials=1, max_memory=1_200_000)
    e2e = {c.form: c for c in fits_each.end_to_end}
    assert e2e["fc_dense"].status == "passed" and not e2e["fc_dense"].partial
    assert "3 conv(s) converted" in e2e["fc_dense"].note
    # a budget below conv1's form: that conv stays a conv, the rest is still compared
    report = verify(make_model(), EXAMPLE_SHAPE, to="fc", trials=1, max_memory=800_000)
    dense = {c.form: c for c in report.end_to_end}["fc_dense"]
    assert dense.status == "passed" and "2 conv(s) converted" in dense.note
    assert dense.partial.startswith("1 conv(s) left unconverted") and "conv1" in dense.partial
    assert report.passed and not verify(
        make_model(), EXAMPLE_SHAPE, to="fc", trials=1, max_memory=800_000, strict=True
    )
