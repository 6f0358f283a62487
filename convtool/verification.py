"""Numerical proof that every form is the conv: comparisons against torch's own conv.

The oracle is always PyTorch itself (the layer's module forward, i.e. `F.conv*d` after the padding
map), run in float64 on the same weights and inputs as the candidates, which are convtool's forms
of the same layer in the verify dtype:

- ``toeplitz_dense`` / ``toeplitz_sparse``: `T @ x + b` with `T` from :mod:`convtool.matrices`
  (dense one block of rows at a time, so `T` is never held whole),
- ``toeplitz_sampled``: when even the sparse `T` exceeds the memory budget, the exact rows of a
  random sample of output channels (for a transposed conv: the exact columns of a random sample of
  input channels, fed an input that is zero elsewhere), built with
  :func:`convtool.matrices.coo_entries` one channel at a time,
- ``lc``: the locally-connected module (not applicable to transposed convs),
- ``fc_dense`` / ``fc_sparse``: the fully-connected module,

and, for a model, the whole model run with each conv's computation replaced by its form (end to
end), one form alive at a time. Each form is built, run and freed before the next.

Every comparison runs on a batch of inputs: `trials` seeded standard-normal inputs, then an
all-ones and an all-zeros input. Without user rtol/atol each element is judged against the
rounding-error bound of its dot product (:mod:`convtool.error_bounds`); :func:`compare` follows
Polygraphy: it returns a :class:`Comparison` whose max errors are the tightest tolerances that
would have passed. The memory budget is `max_memory` or the machine's total memory
(:func:`convtool.resources.memory_budget`), never the momentary free memory, so one call checks
the same forms on every run.

This module never imports typer or rich; rendering lives in :mod:`convtool.render.verify`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from convtool import convert, sizes
from convtool.compare import (
    Comparison,
    Tolerance,
    compare,
    compare_to_bound,
    default_tolerance,
    parse_dtype,
    resolve_tolerance,
)
from convtool.error_bounds import (
    BoundTerms,
    bound_description,
    conv_bound_terms,
    elementwise_bound,
    unit_roundoff,
)
from convtool.errors import ConvtoolError
from convtool.forms import Form, ModelTarget, Target, forms_of, model_forms_of
from convtool.inventory import ConvCall, ConvLayer, capture, intercept, select
from convtool.matrices import (
    bias_vector_for,
    coo_entries,
    dense_row_blocks,
    matrix,
    matrix_info,
)
from convtool.resources import Budget, human_bytes, memory_budget, memory_limit, total_memory
from convtool.spec import ConvSpec, build_conv, is_conv

__all__ = [
    "Comparison",
    "FormCheck",
    "Tolerance",
    "VerifyReport",
    "check_layer",
    "check_model",
    "compare",
    "conv_module",
    "default_tolerance",
    "form_names",
    "model_form_names",
    "model_layers",
    "resolve_tolerance",
    "verify",
    "verify_layers",
]

TARGETS = tuple(Target)
MODEL_NAME = "(model)"
PASSED, FAILED, SKIPPED, NOT_APPLICABLE = "passed", "failed", "skipped", "not applicable"
_SAMPLE_ENTRIES = 2 * 10**7  # template entries x channels a sampled check may touch

Advance = Callable[["FormCheck"], None]


@dataclass(frozen=True)
class FormCheck:
    """One form of one layer (or of the whole model) against the oracle.

    Attributes:
        name: layer name, or '(model)' for the end-to-end comparison.
        form: a :class:`~convtool.forms.Form`: 'toeplitz_dense', 'toeplitz_sparse',
            'toeplitz_sampled', 'lc', 'fc_dense', 'fc_sparse'.
        status: 'passed', 'failed', 'skipped' (too large for the memory budget; see `note`) or
            'not applicable' (the LC form of a transposed conv).
        comparison: the errors, when a comparison ran.
        layer: the layer's description (`ConvSpec.describe()`), '' for a model.
        input_shape, output_shape: one sample for a layer; the full example input for a model.
        worst_input: which input ('random 0', 'ones', ...) holds the largest error.
        note: how the check was done or why it was not.
        seconds: wall time of building the candidate and comparing.
        partial: for a comparison that covered only part of the form (sampled rows, or a model
            with some convs left unconverted), what was left out and why; '' when complete.
    """

    name: str
    form: str
    status: str
    comparison: Comparison | None = None
    layer: str = ""
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    worst_input: str | None = None
    note: str = ""
    seconds: float = 0.0
    partial: str = ""

    @property
    def passed(self) -> bool | None:
        """True/False for a comparison that ran or failed; None when skipped or not applicable."""
        return {PASSED: True, FAILED: False}.get(self.status)

    def to_dict(self) -> dict[str, Any]:
        cmp = self.comparison.to_dict() if self.comparison is not None else {}
        return {
            "name": self.name,
            "form": self.form,
            "status": self.status,
            "passed": self.passed,
            "max_abs_error": cmp.get("max_abs_error"),
            "max_rel_error": cmp.get("max_rel_error"),
            "layer": self.layer,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "worst_input": self.worst_input,
            "note": self.note,
            "seconds": round(self.seconds, 4),
            "partial": self.partial or None,
            **{k: v for k, v in cmp.items() if k not in ("max_abs_error", "max_rel_error")},
        }


@dataclass
class VerifyReport:
    """Every comparison of a `verify` run; `bool(report)` is `report.passed`.

    Attributes:
        checks: per layer and form.
        end_to_end: the converted model against the original (empty for a single layer).
        dtype: 'float32' or 'float64'.
        tolerance: the tolerance every comparison used.
        inputs: labels of the inputs, in batch order ('random 0', ..., 'ones', 'zeros').
        trials, seed: as requested.
        notes: anything the reader should know (e.g. why end-to-end did not run).
        strict: any skipped or partial check makes the report fail.
    """

    checks: list[FormCheck]
    end_to_end: list[FormCheck]
    dtype: str
    tolerance: Tolerance
    inputs: list[str]
    trials: int
    seed: int
    notes: list[str] = field(default_factory=list)
    strict: bool = False

    @property
    def unchecked(self) -> list[FormCheck]:
        """Checks that were skipped or covered only part of their form."""
        return [c for c in self.all_checks if c.status == SKIPPED or c.partial]

    @property
    def all_checks(self) -> list[FormCheck]:
        return [*self.checks, *self.end_to_end]

    @property
    def passed(self) -> bool:
        """No comparison failed and at least one ran (skips alone prove nothing); with
        `strict`, nothing was skipped or only partly checked either."""
        statuses = [c.status for c in self.all_checks]
        if self.strict and self.unchecked:
            return False
        return FAILED not in statuses and PASSED in statuses

    def __bool__(self) -> bool:
        return self.passed

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.all_checks)

    @property
    def failures(self) -> list[FormCheck]:
        return [c for c in self.all_checks if c.status == FAILED]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "tolerance": self.tolerance.to_dict(),
            "trials": self.trials,
            "seed": self.seed,
            "inputs": self.inputs,
            "strict": self.strict,
            "summary": {
                **{s: self.count(s) for s in (PASSED, FAILED, SKIPPED, NOT_APPLICABLE)},
                "partial": sum(bool(c.partial) for c in self.all_checks),
            },
            "layers": [c.to_dict() for c in self.checks],
            "end_to_end": [c.to_dict() for c in self.end_to_end] or None,
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------- helpers
def conv_module(
    spec: ConvSpec, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A fresh `nn.Conv*d` / `nn.ConvTranspose*d` with `spec`'s hyperparameters and copies of
    these tensors (NaN included), cast to `dtype` (default: the weight's): the oracle."""
    dtype = dtype or weight.dtype
    if tuple(weight.shape) != spec.weight_shape:
        raise ConvtoolError(
            f"weight has shape {tuple(weight.shape)} but {spec.describe()} needs "
            f"{spec.weight_shape}"
        )
    copies = [None if t is None else t.detach().to(dtype, copy=True) for t in (weight, bias)]
    assert copies[0] is not None
    return build_conv(spec, copies[0], copies[1]).eval().requires_grad_(False)


def form_names(to: str) -> tuple[str, ...]:
    """Per-layer forms checked for `to` ('toeplitz', 'lc', 'fc' or 'all')."""
    return forms_of(to)


def model_form_names(to: str) -> tuple[str, ...]:
    """End-to-end forms checked for `to`."""
    return model_forms_of(to)


def input_labels(trials: int) -> list[str]:
    return [f"random {i}" for i in range(trials)] + ["ones", "zeros"]


def make_inputs(shape: Sequence[int], trials: int, seed: int, dtype: torch.dtype) -> Tensor:
    """`(trials + 2, *shape)`: seeded standard-normal inputs, then all-ones, then zeros."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn((trials, *shape), generator=gen, dtype=torch.float64).to(dtype)
    ones = torch.ones((1, *shape), dtype=dtype)
    return torch.cat([rand, ones, torch.zeros_like(ones)])


def _check_counts(trials: int, seed: int) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ConvtoolError(f"trials must be a non-negative int, got {trials!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConvtoolError(f"seed must be a non-negative int, got {seed!r}")


def _quiet_forward(
    module: nn.Module, x: Tensor, forward_kwargs: Mapping[str, Any] | None = None
) -> Any:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(x, **dict(forward_kwargs or {}))


# ---------------------------------------------------------------------------------- one layer
@dataclass
class _LayerRun:
    """What every form of one layer shares: inputs, float64 reference, bounds, sizes."""

    layer: ConvLayer
    spec: ConvSpec
    weight: Tensor
    bias: Tensor | None
    sample: tuple[int, ...]
    out: tuple[int, ...]
    x: Tensor  # (K, *sample)
    terms: BoundTerms  # float64 reference (K, *out) and the magnitudes the bound scales with
    tol: Tolerance
    labels: list[str]
    budget: Budget
    seed: int
    warning: str = ""  # NaN/inf in the weights: every form is expected to fail

    @property
    def expected(self) -> Tensor:
        return self.terms.expected

    def result(self, form: str, status: str, **kwargs: Any) -> FormCheck:
        return FormCheck(
            name=self.layer.name,
            form=form,
            status=status,
            layer=self.spec.describe(),
            input_shape=self.sample,
            output_shape=self.out,
            **kwargs,
        )

    def judge(
        self,
        form: str,
        actual: Tensor,
        note: str = "",
        terms: BoundTerms | None = None,
        channels: Tensor | None = None,
    ) -> FormCheck:
        """Compare `actual` with the reference (or `terms`' reference), restricted to output
        `channels` (dim 1) when given, and wrap the result."""
        ref = self.terms if terms is None else terms
        cmp = _judge(ref, actual, self.tol, self.x.dtype, self.labels, channels)
        worst = self.labels[cmp.worst_index[0]] if cmp.worst_index is not None else None
        status = PASSED if cmp.passed else FAILED
        extra = [cmp.note]
        if cmp.nonfinite:
            extra.append(f"{cmp.nonfinite} output position(s) hold NaN/inf{self.warning}")
        note = "; ".join(n for n in (note, *extra) if n)
        return self.result(form, status, comparison=cmp, worst_input=worst, note=note)


def _judge(
    terms: BoundTerms,
    actual: Tensor,
    tol: Tolerance,
    dtype: torch.dtype,
    labels: list[str],
    channels: Tensor | None = None,
) -> Comparison:
    expected = terms.expected if channels is None else terms.expected[:, channels]
    if not tol.arithmetic:
        return compare(expected, actual, tol.rtol, tol.atol, tolerance_source=tol.source)
    random = torch.tensor([label.startswith("random") for label in labels])
    bound = elementwise_bound(terms, dtype, random)
    if channels is not None:
        bound = bound[:, channels]
    return compare_to_bound(expected, actual, bound, source=tol.source)


def check_layer(
    layer: ConvLayer | nn.Module,
    input_shape: Sequence[int],
    *,
    to: str = Target.ALL,
    dtype: torch.dtype | str = torch.float64,
    trials: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_memory: int | None = None,
    advance: Advance | None = None,
) -> list[FormCheck]:
    """Every form of one conv layer against a float64 reference of the layer (module docstring).

    Args:
        layer: a :class:`~convtool.source.ConvLayer` or an `nn.Conv*d`/`nn.ConvTranspose*d`.
        input_shape: one sample `(C_in, *spatial)` (a leading batch dim is accepted).
        to: 'toeplitz', 'lc', 'fc' or 'all'.
        dtype: float32 or float64; weights and inputs are cast to it.
        trials: random inputs besides the all-ones and zero inputs.
        rtol, atol: both or neither. Neither: each element is judged against the rounding-error
            bound of its dot product (:mod:`convtool.error_bounds`).
        max_memory: bytes any one form may use (default: the machine's total memory, so the
            same command checks the same forms on every run); larger forms are skipped, and
            the Toeplitz products fall back to sampled rows.
        advance: called with each :class:`FormCheck` as it completes.

    Returns:
        One :class:`FormCheck` per name in :func:`form_names(to) <form_names>`, in that order.
    """
    dtype = parse_dtype(dtype)
    _check_counts(trials, seed)
    tol = _tolerance(dtype, rtol, atol)
    forms = form_names(to)
    run = _prepare(_as_layer(layer), input_shape, dtype, trials, seed, tol, max_memory)
    checks = []
    for form in forms:
        started = time.perf_counter()
        check = _FORM_CHECKS[form](run)
        check = dataclasses.replace(check, seconds=time.perf_counter() - started)
        checks.append(check)
        if advance is not None:
            advance(check)
    return checks


def _tolerance(dtype: torch.dtype, rtol: float | None, atol: float | None) -> Tolerance:
    """The user's rtol/atol, or (neither given) the per-element rounding-error bound."""
    if rtol is None and atol is None:
        return Tolerance(0.0, 0.0, bound_description(dtype), arithmetic=True)
    return resolve_tolerance(dtype, rtol, atol)


def _as_layer(layer: ConvLayer | nn.Module) -> ConvLayer:
    if isinstance(layer, ConvLayer):
        return layer
    if not is_conv(layer):
        raise ConvtoolError(
            f"expected a conv layer (nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d), got "
            f"{type(layer).__name__}"
        )
    weight = layer.weight
    bias = getattr(layer, "bias", None)
    assert isinstance(weight, Tensor)
    return ConvLayer(type(layer).__name__, ConvSpec.from_module(layer), weight, bias, module=layer)


def _prepare(
    layer: ConvLayer,
    input_shape: Sequence[int],
    dtype: torch.dtype,
    trials: int,
    seed: int,
    tol: Tolerance,
    max_memory: int | None,
) -> _LayerRun:
    spec = layer.spec
    sample = spec.sample_shape(input_shape)
    out = spec.output_shape(sample)
    for what, t in (("weight", layer.weight), ("bias", layer.bias)):
        if isinstance(t, Tensor) and t.is_meta:
            raise ConvtoolError(
                f"the {what} of {layer.name!r} is on the meta device and holds no values; "
                f"materialise it first (e.g. module.to_empty(device='cpu') then load_state_dict)"
            )
    # The oracle itself must run whatever max_memory (a per-form budget) says: its inputs and
    # outputs, and as much again while comparing (see _io_bytes), must fit in the machine.
    itemsize = torch.empty((), dtype=dtype).element_size()
    io_bytes = (trials + 2) * (math.prod(sample) + math.prod(out)) * itemsize * 2
    if io_bytes > total_memory():
        raise ConvtoolError(
            f"checking {spec.describe()} on input {sample} (output {out}) needs "
            f"{human_bytes(io_bytes)} for {trials + 2} inputs and the conv's outputs, more than "
            f"the machine's memory ({human_bytes(total_memory())}); use a smaller input "
            f"shape or fewer trials"
        )
    weight = layer.weight.detach().to(dtype)
    bias = layer.bias.detach().to(dtype) if layer.bias is not None else None
    conv_module(spec, weight, bias, dtype)  # the weight's shape must fit the spec
    x = make_inputs(sample, trials, seed, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        terms = conv_bound_terms(spec, weight, bias, x)
    bad = [
        f"{int((~torch.isfinite(t)).sum())} in the {what}"
        for what, t in (("weight", weight), ("bias", bias))
        if t is not None and not bool(torch.isfinite(t).all())
    ]
    warning = f" (NaN/inf values: {', '.join(bad)})" if bad else ""
    return _LayerRun(
        layer, spec, weight, bias, sample, out, x, terms, tol, input_labels(trials),
        memory_budget(max_memory), seed, warning,
    )  # fmt: skip


def _too_big(need: int, budget: Budget) -> str:
    return f"needs {human_bytes(need)} > {budget.describe()}"


def _sparse_need(nnz: int, rows: int, itemsize: int) -> int:
    return sizes.sparse_build_bytes(nnz, rows, itemsize)


def _io_bytes(run: _LayerRun) -> int:
    # inputs, the candidate's output and the float64 reference with its two magnitude terms
    return run.x.numel() * run.x.element_size() + run.expected.numel() * (
        run.x.element_size() + 3 * 8
    )


_BLOCK_BYTES = 64 * 2**20  # a dense row block; T itself is never held whole


def _toeplitz_dense(run: _LayerRun) -> FormCheck:
    """`T @ x + b` one block of rows at a time (the dense builder's own blocks)."""
    info = matrix_info(run.spec, run.sample, run.weight.dtype)
    need = info.dense_bytes + _io_bytes(run)
    if need > run.budget.nbytes:
        return run.result(
            Form.TOEPLITZ_DENSE, SKIPPED, note=f"dense T {_too_big(need, run.budget)}"
        )
    rows, cols = info.shape
    block_rows = max(1, _BLOCK_BYTES // max(1, cols * info.itemsize))
    xf = run.x.reshape(run.x.shape[0], -1)
    y = xf.new_empty((xf.shape[0], rows))
    for r0, block in dense_row_blocks(run.spec, run.weight, run.sample, block_rows):
        y[:, r0 : r0 + block.shape[0]] = xf @ block.T
        del block
    y += _bias(run)
    return run.judge(Form.TOEPLITZ_DENSE, y.reshape(run.expected.shape))


def _bias(run: _LayerRun) -> Tensor:
    return bias_vector_for(run.spec, run.bias, run.sample, run.weight.dtype)


def _toeplitz_sparse(run: _LayerRun) -> FormCheck:
    info = matrix_info(run.spec, run.sample, run.weight.dtype)
    need = _sparse_need(info.nnz, info.shape[0], info.itemsize) + _io_bytes(run)
    if need > run.budget.nbytes:
        return _toeplitz_sampled(run, f"sparse T {_too_big(need, run.budget)}")
    t = matrix(run.spec, run.weight, run.sample, sparse=True, layout="csr")
    y = (t @ run.x.reshape(run.x.shape[0], -1).T).T + _bias(run)
    del t
    return run.judge(Form.TOEPLITZ_SPARSE, y.reshape(run.expected.shape))


def _toeplitz_sampled(run: _LayerRun, why: str) -> FormCheck:
    """Exact rows (conv) or columns (transposed) of a few channels, one channel at a time."""
    spec, k = run.spec, run.x.shape[0]
    per_channel = _template_bytes(run, k)
    room = (run.budget.nbytes - _io_bytes(run)) // max(1, per_channel)
    fit = min(room, max(1, _SAMPLE_ENTRIES // _entries(run)), 8)
    if fit < 1:
        return run.result(
            Form.TOEPLITZ_SAMPLED, SKIPPED,
            note=f"{why}; even one channel's rows with the inputs and reference "
            f"{_too_big(per_channel + _io_bytes(run), run.budget)}",
        )  # fmt: skip
    gen = torch.Generator().manual_seed(run.seed + 1)
    if not spec.transposed:
        picks = torch.randperm(spec.out_channels, generator=gen)[:fit].sort().values
        actual = _sampled_rows(run, [int(c) for c in picks])
        what = f"rows of {len(picks)} of {spec.out_channels} output channels ({_list(picks)})"
        note = f"{why}; checked the {what}"
        check = run.judge(Form.TOEPLITZ_SAMPLED, actual, note, channels=picks)
        return dataclasses.replace(check, partial=f"only the {what}: {why}")
    # T = F^T: columns of T are rows of the forward matrix F, one per input channel.
    picks = torch.randperm(spec.in_channels, generator=gen)[:fit].sort().values
    mask = torch.zeros(spec.in_channels, dtype=torch.bool)
    mask[picks] = True
    x = run.x * mask.view(1, -1, *([1] * spec.ndim)).to(run.x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        terms = conv_bound_terms(spec, run.weight, run.bias, x)
    actual = _sampled_columns(run, x, [int(c) for c in picks])
    what = f"columns of {len(picks)} of {spec.in_channels} input channels ({_list(picks)})"
    note = f"{why}; checked the {what} on inputs zero elsewhere"
    check = run.judge(Form.TOEPLITZ_SAMPLED, actual, note, terms=terms)
    return dataclasses.replace(check, partial=f"only the {what}: {why}")


def _list(picks: Tensor) -> str:
    return ", ".join(str(int(c)) for c in picks)


def _entries(run: _LayerRun) -> int:
    """Template entries of one forward output channel (before padding taps are removed)."""
    spec = run.spec
    if spec.transposed:  # the forward conv reads this layer's output and writes its input
        p_out, cin_g = math.prod(run.sample[1:]), spec.out_channels // spec.groups
    else:
        p_out, cin_g = math.prod(run.out[1:]), spec.in_channels // spec.groups
    return max(1, p_out * cin_g * spec.kernel_numel)


def _template_bytes(run: _LayerRun, k: int) -> int:
    # the template (~6 int64 arrays while built) + one channel's (rows, cols, vals) + the gather
    return _entries(run) * (6 * 8 + 24 + k * run.x.element_size() * 2)


def _sampled_rows(run: _LayerRun, channels: list[int]) -> Tensor:
    """`T[rows of channels] @ x + b` for a conv: `(K, len(channels), *out_spatial)`."""
    k, p_out = run.x.shape[0], math.prod(run.out[1:])
    xf = run.x.reshape(k, -1)
    ys = []
    for c in channels:
        rows, cols, vals = coo_entries(run.spec, run.weight, run.sample, slice(c, c + 1))
        y = xf.new_zeros((k, p_out)).index_add_(1, rows - c * p_out, xf[:, cols] * vals)
        ys.append(y + (run.bias[c] if run.bias is not None else 0))
    return torch.stack(ys, 1).reshape(k, len(channels), *run.out[1:])


def _sampled_columns(run: _LayerRun, x: Tensor, channels: list[int]) -> Tensor:
    """`T @ x + b` for a transposed conv whose input is zero outside `channels`."""
    k = x.shape[0]
    xf = x.reshape(k, -1)
    y = xf.new_zeros((k, math.prod(run.out)))
    for c in channels:
        # forward rows = this layer's input positions, forward cols = its output positions
        rows, cols, vals = coo_entries(run.spec, run.weight, run.sample, slice(c, c + 1))
        y.index_add_(1, cols, xf[:, rows] * vals)
    return (y + _bias(run)).reshape(k, *run.out)


def _lc_need(run: _LayerRun) -> int:
    spec, item = run.spec, run.x.element_size()
    p_out = math.prod(run.out[1:])
    weight = spec.out_channels * p_out * (spec.in_channels // spec.groups) * spec.kernel_numel
    unfold = run.x.shape[0] * spec.in_channels * spec.kernel_numel * p_out
    # the LC weight once (built, then filled in place) and the unfolded input with its product
    return (weight + 2 * unfold) * item + _io_bytes(run)


def _lc(run: _LayerRun) -> FormCheck:
    if run.spec.transposed:
        return run.result(
            Form.LC, NOT_APPLICABLE, note="a transposed conv has no locally-connected form"
        )
    need = _lc_need(run)
    if need > run.budget.nbytes:
        return run.result(Form.LC, SKIPPED, note=f"LC module {_too_big(need, run.budget)}")
    return _module_form(run, Form.LC, lambda conv: convert.to_locally_connected(conv, run.sample))


def _fc(run: _LayerRun, sparse: bool) -> FormCheck:
    form = Form.FC_SPARSE if sparse else Form.FC_DENSE
    info = matrix_info(run.spec, run.sample, run.weight.dtype)
    sparse_need = _sparse_need(info.nnz, info.shape[0], info.itemsize)
    need = (sparse_need if sparse else info.dense_bytes) + _io_bytes(run)
    if need > run.budget.nbytes:
        return run.result(form, SKIPPED, note=f"FC module {_too_big(need, run.budget)}")
    return _module_form(
        run,
        form,
        lambda conv: convert.to_fully_connected(
            conv, run.sample, sparse=sparse, max_memory=run.budget.nbytes
        ),
    )


def _module_form(run: _LayerRun, form: str, build: Callable[[nn.Module], nn.Module]) -> FormCheck:
    conv = conv_module(run.spec, run.weight, run.bias, run.weight.dtype)
    try:
        candidate = build(conv)
    except ConvtoolError as exc:  # e.g. a converter refusing NaN weights: not a pass
        return run.result(form, FAILED, note=f"building the {form} form failed: {exc}")
    actual = _quiet_forward(candidate.eval(), run.x)
    del candidate, conv  # before comparing: one form alive at a time
    if not isinstance(actual, Tensor):
        return run.result(form, FAILED, note=f"the {form} module returned {type(actual).__name__}")
    return run.judge(form, actual)


_FORM_CHECKS: dict[str, Callable[[_LayerRun], FormCheck]] = {
    Form.TOEPLITZ_DENSE: _toeplitz_dense,
    Form.TOEPLITZ_SPARSE: _toeplitz_sparse,
    Form.LC: _lc,
    Form.FC_DENSE: lambda run: _fc(run, sparse=False),
    Form.FC_SPARSE: lambda run: _fc(run, sparse=True),
}


# ---------------------------------------------------------------------------------- a model
# End to end, float32: the converted model is judged against the float64 reference relative to
# the error of torch's own float32 run of the original model on the same inputs (the error of a
# deep network is not a sum of per-layer bounds one can write down: nonlinearities and
# normalisation amplify or damp it). Each element may be off by this many times the largest
# error torch's own float32 run makes on that input, plus as many float32 roundings of itself.
# Converted forms add in other orders (CSR rows are sequential sums), so their per-layer
# errors run up to ~10x torch's; 64 leaves room for that (benchmarks/whole_model.py prints the
# ratios observed on a ResNet-18-shaped network).
MODEL_KAPPA = 64.0


def _leaves(out: Any) -> list[Tensor]:
    leaves: list[Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            leaves.append(value.detach())
        elif isinstance(value, dict):
            for key in value:
                walk(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(out)
    return leaves


def _flatten_outputs(out: Any) -> Tensor:
    """All tensors of a (nested) model output, flattened and concatenated in order."""
    leaves = _leaves(out)
    if not leaves:
        raise ConvtoolError(f"the model returned no tensor (got {type(out).__name__})")
    return torch.cat([_wide(t).reshape(-1) for t in leaves])


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.float64) if t.is_floating_point() else t


def _run_model(
    model: nn.Module,
    inputs: Tensor,
    batched: bool = False,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Outputs for each example input `(K, *example_shape)`: `(K, numel of one output)`.

    With `batched`, the K inputs go through one forward, concatenated along the batch dim (see
    :func:`_batched_outputs`)."""
    try:
        if batched:
            out = _batched_outputs(model, inputs, forward_kwargs)
            assert out is not None
            return out
        return torch.stack(
            [_flatten_outputs(_quiet_forward(model, x, forward_kwargs)) for x in inputs]
        )
    except (ConvtoolError, _BuildError):
        raise
    except Exception as exc:
        raise ConvtoolError(
            f"running the model on an input of shape {tuple(inputs.shape[1:])} failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def _batched_outputs(
    model: nn.Module, inputs: Tensor, forward_kwargs: Mapping[str, Any] | None = None
) -> Tensor | None:
    """`(K, numel)` from one forward on the K inputs stacked along the batch dim, or None when
    the output is not per-sample along dim 0."""
    k, n = inputs.shape[0], inputs.shape[1]
    leaves = _leaves(
        _quiet_forward(model, inputs.reshape(k * n, *inputs.shape[2:]), forward_kwargs)
    )
    if not leaves or any(t.dim() == 0 or t.shape[0] != k * n for t in leaves):
        return None
    return torch.cat([_wide(t).reshape(k, -1) for t in leaves], dim=1)


def _batches_alike(
    model: nn.Module,
    inputs: Tensor,
    expected: Tensor,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> bool:
    """Whether one forward on all inputs gives each input's own outputs (BatchNorm in eval,
    no reshape that mixes samples): then each form is built once, not once per input."""
    try:
        out = _batched_outputs(model, inputs, forward_kwargs)
    except Exception:
        return False
    if out is None or out.shape != expected.shape:
        return False
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    atol = 1e-12 * max(scale, 1e-300)
    return bool(torch.allclose(out, expected, rtol=1e-9, atol=atol, equal_nan=True))


def check_model(
    model: nn.Module,
    example_shape: Sequence[int],
    *,
    to: str = Target.ALL,
    dtype: torch.dtype | str = torch.float64,
    trials: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    layers: Sequence[str] | None = None,
    max_memory: int | None = None,
    advance: Advance | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> list[FormCheck]:
    """The converted model against the original, on inputs of the example's shape (end to end).

    The model runs with the computation of each converted conv replaced by its form, built when
    the conv is called and freed right after, so only one form is in memory at a time (a model
    converted with :func:`convtool.models.convert_with_report` holds them all). A form larger than
    the budget is left as the conv and named in `partial`. Convs that are not converted
    (functional calls, convs called on several shapes, transposed convs for 'lc') are named in
    the check's note, since the comparison says nothing about them.

    Tolerance: user rtol/atol against a float64 run of the model; without them, in float64,
    `torch.testing`'s float64 defaults, and in float32 a bound scaled by the error of torch's own
    float32 run of the original model (:data:`MODEL_KAPPA`).

    Args:
        model: any eager module (or exported GraphModule); copies in `dtype` and float64 are
            used, `model` itself is untouched. TorchScript modules cannot be converted: their
            checks are skipped.
        example_shape: the full example input including batch, e.g. `(1, 3, 32, 32)`.
        layers: names of the convs to convert (default: all).
        Others: as :func:`check_layer`.

    Returns:
        One :class:`FormCheck` per name in :func:`model_form_names(to) <model_form_names>`.
    """
    dtype = parse_dtype(dtype)
    _check_counts(trials, seed)
    user = rtol is not None or atol is not None
    tol = resolve_tolerance(dtype, rtol, atol)
    shape = tuple(int(s) for s in example_shape)
    forms = model_form_names(to)
    checks: list[FormCheck] = []
    if isinstance(model, torch.jit.ScriptModule):
        why = "a TorchScript module cannot be converted; verify its eager model or .pt2 export"
        checks = [FormCheck(MODEL_NAME, f, SKIPPED, input_shape=shape, note=why) for f in forms]
    elif forms:
        run = _model_run(
            model, shape, dtype, trials, seed, tol, user, layers, max_memory, forward_kwargs
        )
        for form in forms:
            started = time.perf_counter()
            check = _model_form(run, form)
            checks.append(dataclasses.replace(check, seconds=time.perf_counter() - started))
    for check in checks:
        if advance is not None:
            advance(check)
    return checks


@dataclass
class _ModelRun:
    work: nn.Module  # a copy in the verify dtype; the forms replace its convs' outputs
    shape: tuple[int, ...]
    inputs: Tensor
    expected: Tensor  # float64 reference (K, numel)
    bound: Tensor | None  # per element; None: use tol
    tol: Tolerance
    labels: list[str]
    layers: Sequence[str] | None
    budget: Budget
    batched: bool
    capture: Any  # the inventory of the model's conv calls (convtool.inventory.Inventory)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)

    def result(self, form: str, status: str, **kwargs: Any) -> FormCheck:
        out = tuple(self.expected.shape[1:])
        return FormCheck(MODEL_NAME, form, status, input_shape=self.shape, output_shape=out,
                         **kwargs)  # fmt: skip


def _model_run(
    model: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    trials: int,
    seed: int,
    tol: Tolerance,
    user: bool,
    layers: Sequence[str] | None,
    max_memory: int | None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> _ModelRun:
    kw = dict(forward_kwargs or {})
    with warnings.catch_warnings():  # deep-copying exported GraphModules warns about pytree
        warnings.simplefilter("ignore")
        work = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        wide = work if dtype == torch.float64 else copy.deepcopy(work).to(torch.float64)
    inputs = make_inputs(shape, trials, seed, dtype)
    wide_inputs = inputs.to(torch.float64)
    expected = _run_model(wide, wide_inputs, forward_kwargs=kw)
    batched = _batches_alike(wide, wide_inputs, expected, kw)
    del wide
    bound = None
    if not user and dtype != torch.float64:
        own = _run_model(work, inputs, batched, kw)
        if own.shape == expected.shape:
            u = unit_roundoff(dtype)
            err = torch.where(torch.isfinite(own), (own - expected).abs(), 0.0)
            worst = err.amax(dim=1, keepdim=True) if err.numel() else err
            bound = MODEL_KAPPA * (worst + u * expected.abs())
            tol = Tolerance(
                0.0, 0.0,
                f"{MODEL_KAPPA:g} x (largest error of torch's own {str(dtype)[6:]} run of the "
                f"model on that input + u*|y|), u={u:.3g}",
                arithmetic=True,
            )  # fmt: skip
    cap = capture(work, shape, kw)
    return _ModelRun(
        work, shape, inputs, expected, bound, tol, input_labels(trials), layers,
        memory_budget(max_memory), batched, cap, kw,
    )  # fmt: skip


def _form_need(spec: ConvSpec, sample: tuple[int, ...], form: str, run: _ModelRun) -> int:
    """Bytes one layer's form takes while it runs on the inputs."""
    item = run.inputs.element_size()
    batch = run.inputs.shape[0] * run.shape[0] if run.batched else run.shape[0]
    info = matrix_info(spec, sample, run.inputs.dtype)
    out = spec.output_shape(sample)
    if form == Form.LC:
        p_out = math.prod(out[1:])
        taps = spec.in_channels // spec.groups * spec.kernel_numel
        weight = spec.out_channels * p_out * taps
        return (weight + 2 * batch * spec.in_channels * spec.kernel_numel * p_out) * item
    if form == Form.FC_DENSE:
        return info.dense_bytes
    return _sparse_need(info.nnz, info.shape[0], info.itemsize)


def _model_form(run: _ModelRun, form: str) -> FormCheck:
    cap = run.capture
    names = set(run.layers) if run.layers is not None else {x.name for x in cap.layers}
    to = ModelTarget.LC if form == Form.LC else ModelTarget.FC
    sparse = form == Form.FC_SPARSE
    kept = (
        sorted(x.name for x in cap.layers if x.name in names and x.spec.transposed)
        if to == ModelTarget.LC
        else []
    )
    names -= set(kept)
    notes = [f"transposed convs have no LC form, kept: {', '.join(kept)}"] if kept else []
    cap = run.capture
    plan: dict[str, tuple[int, ...]] = {}
    over: list[str] = []
    for name in sorted(names):
        if name not in cap.input_shapes:
            notes.append(f"conv {name!r} was not converted: the model does not call it")
        elif name in cap.conflicts:
            seen = ", ".join(str(s) for s in cap.conflicts[name])
            notes.append(f"conv {name!r} was not converted: called on several shapes ({seen})")
        elif name in cap.custom:
            notes.append(f"conv {name!r} was not converted: its forward is not a plain conv")
        else:
            sample = cap.input_shapes[name]
            layer = cap.get(name)
            if layer.skipped is not None or not layer.exact_spec:
                notes.append(f"conv {name!r} was not converted: {layer.skipped or 'padded'}")
                continue
            need = _form_need(layer.spec, sample, form, run)
            if need > run.budget.nbytes:
                over.append(f"{name} ({human_bytes(need)})")
            else:
                plan[name] = sample
    if cap.functional:
        notes.append(
            f"{len(cap.functional)} conv call(s) with weights computed from the input left as "
            f"they are"
        )
    partial = ""
    if over:
        partial = f"{len(over)} conv(s) left unconverted, each over {run.budget.describe()}: "
        partial += ", ".join(over[:6]) + (", ..." if len(over) > 6 else "")
        notes.append(partial)
    if not plan:
        status = SKIPPED if over else NOT_APPLICABLE
        return run.result(form, status, note="; ".join(notes) or "no conv to convert")
    notes.insert(0, f"{len(plan)} conv(s) converted")
    try:
        actual = _run_converted(run, plan, to, sparse)
    except _BuildError as exc:
        return run.result(form, FAILED, note=f"converting the model failed: {exc}")
    if run.bound is not None:
        cmp = compare_to_bound(run.expected, actual, run.bound, source=run.tol.source)
    else:
        cmp = compare(run.expected, actual, run.tol.rtol, run.tol.atol,
                      tolerance_source=run.tol.source)  # fmt: skip
    worst = run.labels[cmp.worst_index[0]] if cmp.worst_index is not None else None
    if cmp.nonfinite:
        notes.append(f"{cmp.nonfinite} output value(s) hold NaN/inf")
    status = PASSED if cmp.passed else FAILED
    note = "; ".join(n for n in (*notes, cmp.note) if n)
    return run.result(form, status, comparison=cmp, worst_input=worst, note=note, partial=partial)


class _BuildError(Exception):
    """A form could not be built (e.g. the converter refused NaN weights)."""


def _run_converted(
    run: _ModelRun, plan: dict[str, tuple[int, ...]], to: str, sparse: bool
) -> Tensor:
    """The model's outputs with each planned conv call's output computed by its form instead.

    Every conv call is intercepted (module convs, subclasses and functional calls alike, see
    :func:`convtool.inventory.intercept`); a planned call at its planned input shape is computed
    by its form, built there and freed right after, so one form is alive at a time."""

    def handle(call: ConvCall, original: Callable[[], Any]) -> Any:
        sample = plan.get(call.name)
        if sample is None or call.spec is None:
            return original()
        x = call.input
        batched = x.dim() == call.spec.ndim + 2
        if tuple(x.shape[1:] if batched else x.shape) != tuple(sample):
            return original()  # the same call at another size stays a conv
        form: nn.Module
        try:
            conv = build_conv(call.spec, call.weight.detach(), _detached(call.bias))
            if to == ModelTarget.LC:
                form = convert.to_locally_connected(conv, sample)
            else:
                form = convert.to_fully_connected(
                    conv, sample, sparse=sparse, max_memory=run.budget.nbytes
                )
        except ConvtoolError as exc:
            raise _BuildError(f"layer {call.name!r}: {exc}") from None
        result = form.eval()(x if batched else x.unsqueeze(0))
        del form  # freed before the next conv runs
        return result if batched else result.squeeze(0)

    with warnings.catch_warnings(), intercept(run.work, handle):
        warnings.simplefilter("ignore")
        return _run_model(run.work, run.inputs, run.batched, run.forward_kwargs)


def _detached(t: Tensor | None) -> Tensor | None:
    return t.detach() if t is not None else None


F = TypeVar("F", bound=Callable[..., Any])


def _within_budget(fn: F) -> F:
    """Run `fn` with the memory checks of everything it calls held to its `max_memory` budget
    (or the machine's total memory), never the momentary free memory."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with memory_limit(memory_budget(kwargs.get("max_memory")).nbytes):
            return fn(*args, **kwargs)

    return cast(F, wrapper)


# ---------------------------------------------------------------------------------- front doors
@_within_budget
def verify_layers(
    layers: Sequence[tuple[ConvLayer, Sequence[int]]],
    *,
    model: nn.Module | None = None,
    example_shape: Sequence[int] | None = None,
    to: str = Target.ALL,
    dtype: torch.dtype | str = torch.float64,
    trials: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_memory: int | None = None,
    end_to_end: bool = True,
    strict: bool = False,
    advance: Advance | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check `layers` (each with its one-sample input shape) and, given a model, end to end.

    The end-to-end comparison converts only the listed layers. See :func:`check_layer` and
    :func:`check_model` for the arguments; with `strict`, any skipped or partial check fails
    the report.

    Raises:
        ConvtoolError: when nothing at all could be compared (every check skipped or not
            applicable), saying why; a report that compared nothing would prove nothing.
    """
    dtype = parse_dtype(dtype)
    _check_counts(trials, seed)
    tol = _tolerance(dtype, rtol, atol)
    form_names(to)  # validate before any work
    for layer, shape in layers:  # every shape error before the first comparison
        layer.spec.output_shape(shape)
    kwargs: dict[str, Any] = dict(
        to=to, dtype=dtype, trials=trials, seed=seed, rtol=rtol, atol=atol,
        max_memory=max_memory, advance=advance,
    )  # fmt: skip
    checks = [c for layer, shape in layers for c in check_layer(layer, shape, **kwargs)]
    notes: list[str] = []
    e2e: list[FormCheck] = []
    if model is not None and end_to_end and example_shape is not None:
        names = [layer.name for layer, _ in layers]
        e2e = check_model(model, example_shape, layers=names, forward_kwargs=forward_kwargs,
                          **kwargs)  # fmt: skip
    elif model is None and end_to_end and example_shape is not None:
        notes.append("no end-to-end comparison: the source has no model, only conv layers")
    report = VerifyReport(
        checks=checks,
        end_to_end=e2e,
        dtype=str(dtype).removeprefix("torch."),
        tolerance=tol,
        inputs=input_labels(trials),
        trials=trials,
        seed=seed,
        notes=notes,
        strict=strict,
    )
    if not any(c.comparison is not None or c.status == FAILED for c in report.all_checks):
        raise ConvtoolError(f"nothing was compared: {_why_nothing(report.all_checks)}")
    return report


def _why_nothing(checks: Sequence[FormCheck]) -> str:
    """The distinct reasons the checks did not run, shortest first, at most three."""
    reasons: dict[str, list[str]] = {}
    for c in checks:
        reasons.setdefault(c.note or c.status, []).append(f"{c.name}/{c.form}")
    parts = [f"{', '.join(where[:3])}{', ...' if len(where) > 3 else ''}: {why}"
             for why, where in sorted(reasons.items(), key=lambda kv: len(kv[0]))]  # fmt: skip
    return "; ".join(parts[:3]) or "no check to run"


def model_layers(
    model: nn.Module,
    example_shape: Sequence[int],
    forward_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[tuple[ConvLayer, tuple[int, ...]]], list[str]]:
    """(layer, one-sample input shape) for every conv call the model makes on `example_shape`
    (see :mod:`convtool.inventory`; a call seen at several shapes once per shape), and notes on
    the calls that cannot be checked alone."""
    inv = capture(model, tuple(int(s) for s in example_shape), forward_kwargs)
    pairs, notes = [], []
    for layer in inv.layers:
        # a call at several sizes has no single matrix, but each size can be checked alone
        if (layer.skipped is not None and not layer.conflict) or not layer.input_shapes:
            why = layer.skipped or "it is not called on the example input"
            notes.append(f"conv {layer.name!r} is not checked: {why}")
            continue
        if len(layer.input_shapes) > 1:
            seen = ", ".join(str(s) for s in layer.input_shapes)
            notes.append(
                f"conv {layer.name!r} is called on {len(layer.input_shapes)} input shapes "
                f"({seen}): each checked at its own; it is left unconverted end to end"
            )
        for shape in layer.input_shapes:
            pairs.append((dataclasses.replace(layer, input_shape=shape, skipped=None), shape))
    notes += [f"not checked: {f.describe()}" for f in inv.computed]
    return pairs, notes


def verify(
    target: nn.Module | ConvLayer,
    input_shape: Sequence[int],
    *,
    to: str = Target.ALL,
    dtype: torch.dtype | str = torch.float64,
    trials: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    layers: str | Sequence[str] | None = None,
    max_memory: int | None = None,
    end_to_end: bool = True,
    strict: bool = False,
    advance: Advance | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Prove numerically that convtool's forms compute what the conv (or model) computes.

    Args:
        target: a conv layer (`nn.Conv*d`, `nn.ConvTranspose*d`, a
            :class:`~convtool.source.ConvLayer`) or any model containing convs.
        input_shape: for a conv, one sample `(C_in, *spatial)` (a leading batch is accepted);
            for a model, the full example input including batch, e.g. `(1, 3, 32, 32)`.
        to: 'toeplitz', 'lc', 'fc' or 'all' (default).
        dtype: float32 or float64 (default); the oracle and the forms both run in it.
        trials: seeded standard-normal inputs, besides an all-ones and a zero input.
        seed: seed of the random inputs.
        rtol, atol: both or neither. Neither: each output element is judged against a bound on
            the rounding error of its dot product (length and magnitudes of its terms, see
            :mod:`convtool.error_bounds`), against a float64 reference; the report gives the
            bound, the ratio error / bound and the tightest tolerances that would have passed.
        layers: for a model, glob pattern(s) of the conv names to check (and to convert end to
            end); default all.
        max_memory: bytes any one form may use (default: the machine's total memory, or the
            process's limit when lower: the same call checks the same forms on every run).
        end_to_end: for a model, also compare the whole converted model with the original.
        strict: any skipped or partial (sampled) check fails the report.
        advance: called with each :class:`FormCheck` as it completes.
        forward_kwargs: for a model, further keyword arguments of its forward.

    Returns:
        A :class:`VerifyReport`; `bool(report)` is `report.passed`.

    Raises:
        ConvtoolError: bad arguments, or nothing at all could be compared (e.g. `max_memory=0`).

    Example:
        >>> report = verify(nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16))
        >>> assert report, report.failures
    """
    if isinstance(target, ConvLayer) or is_conv(target):
        if layers is not None:
            raise ConvtoolError("layers= selects convs of a model; the target is one conv layer")
        pairs: list[tuple[ConvLayer, Sequence[int]]] = [(_as_layer(target), input_shape)]
        model, example, notes = None, None, list[str]()
    elif isinstance(target, nn.Module):
        example = tuple(int(s) for s in input_shape)
        found, notes = model_layers(target, example, forward_kwargs)
        if not found:
            raise ConvtoolError(f"{type(target).__name__} calls no conv layer on input {example}")
        pattern = layers if layers is None or isinstance(layers, str) else ",".join(layers)
        chosen = set(select([layer.name for layer, _ in found], pattern))
        pairs = [(layer, shape) for layer, shape in found if layer.name in chosen]
        model = target
    else:
        raise ConvtoolError(f"verify() takes a conv layer or a model, got {type(target).__name__}")
    report = verify_layers(
        pairs, model=model, example_shape=example, to=to, dtype=dtype, trials=trials,
        seed=seed, rtol=rtol, atol=atol, max_memory=max_memory, end_to_end=end_to_end,
        strict=strict, advance=advance, forward_kwargs=forward_kwargs,
    )  # fmt: skip
    report.notes[:0] = notes
    return report
