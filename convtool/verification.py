"""Numerical proof that every form is the conv: comparisons against torch's own conv.

The oracle is always PyTorch itself (the layer's module forward, i.e. `F.conv*d` after the padding
map); the candidates are convtool's forms of the same layer in the same dtype:

- ``toeplitz_dense`` / ``toeplitz_sparse``: `T @ x + b` with `T` from :func:`convtool.matrices`,
- ``toeplitz_sampled``: when even the sparse `T` exceeds the memory budget, the exact rows of a
  random sample of output channels (for a transposed conv: the exact columns of a random sample of
  input channels, fed an input that is zero elsewhere), built with
  :func:`convtool.matrices.coo_entries` one channel at a time,
- ``lc``: the locally-connected module (not applicable to transposed convs),
- ``fc_dense`` / ``fc_sparse``: the fully-connected module,

and, for a model, the whole converted model against the original (end to end).

Every comparison runs on a batch of inputs: `trials` seeded standard-normal inputs, then an
all-ones and an all-zeros input. :func:`compare` follows Polygraphy: it returns a
:class:`Comparison` whose max errors are the tightest tolerances that would have passed.

This module never imports typer or rich; rendering lives in :mod:`convtool.render.verify`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from convtool import convert, models, sizes
from convtool.compare import (
    Comparison,
    Tolerance,
    compare,
    default_tolerance,
    parse_dtype,
    resolve_tolerance,
)
from convtool.errors import ConvtoolError
from convtool.forms import Form, ModelTarget, Target, forms_of, model_forms_of
from convtool.io.source import ConvLayer
from convtool.matrices import bias_vector_for, coo_entries, matrix, matrix_info
from convtool.resources import available_memory, human_bytes
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
    """

    checks: list[FormCheck]
    end_to_end: list[FormCheck]
    dtype: str
    tolerance: Tolerance
    inputs: list[str]
    trials: int
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def all_checks(self) -> list[FormCheck]:
        return [*self.checks, *self.end_to_end]

    @property
    def passed(self) -> bool:
        """No comparison failed and at least one ran (skips alone prove nothing)."""
        statuses = [c.status for c in self.all_checks]
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
            "summary": {s: self.count(s) for s in (PASSED, FAILED, SKIPPED, NOT_APPLICABLE)},
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


def _budget(max_memory: int | None) -> int:
    return available_memory() if max_memory is None else max_memory


def _quiet_forward(module: nn.Module, x: Tensor) -> Any:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(x)


# ---------------------------------------------------------------------------------- one layer
@dataclass
class _LayerRun:
    """What every form of one layer shares: inputs, oracle output, sizes."""

    layer: ConvLayer
    spec: ConvSpec
    weight: Tensor
    bias: Tensor | None
    sample: tuple[int, ...]
    out: tuple[int, ...]
    x: Tensor  # (K, *sample)
    expected: Tensor  # (K, *out)
    tol: Tolerance
    labels: list[str]
    budget: int
    seed: int
    warning: str = ""  # NaN/inf in the weights: every form is expected to fail

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
        self, form: str, actual: Tensor, note: str = "", expected: Tensor | None = None
    ) -> FormCheck:
        """Compare `actual` with the oracle's output (or `expected`) and wrap the result."""
        ref = self.expected if expected is None else expected
        cmp = compare(ref, actual, self.tol.rtol, self.tol.atol, tolerance_source=self.tol.source)
        worst = self.labels[cmp.worst_index[0]] if cmp.worst_index is not None else None
        status = PASSED if cmp.passed else FAILED
        extra = [cmp.note]
        if cmp.nonfinite:
            extra.append(f"{cmp.nonfinite} output position(s) hold NaN/inf{self.warning}")
        note = "; ".join(n for n in (note, *extra) if n)
        return self.result(form, status, comparison=cmp, worst_input=worst, note=note)


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
    """Every form of one conv layer against the layer itself (see module docstring).

    Args:
        layer: a :class:`~convtool.io.source.ConvLayer` or an `nn.Conv*d`/`nn.ConvTranspose*d`.
        input_shape: one sample `(C_in, *spatial)` (a leading batch dim is accepted).
        to: 'toeplitz', 'lc', 'fc' or 'all'.
        dtype: float32 or float64; weights and inputs are cast to it.
        trials: random inputs besides the all-ones and zero inputs.
        rtol, atol: both or neither (neither: `torch.testing`'s defaults for `dtype`).
        max_memory: bytes any one form may use (default: available memory); larger forms are
            skipped, and the Toeplitz product falls back to sampled rows.
        advance: called with each :class:`FormCheck` as it completes.

    Returns:
        One :class:`FormCheck` per name in :func:`form_names(to) <form_names>`, in that order.
    """
    dtype = parse_dtype(dtype)
    _check_counts(trials, seed)
    tol = resolve_tolerance(dtype, rtol, atol)
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
    if io_bytes > available_memory():
        raise ConvtoolError(
            f"checking {spec.describe()} on input {sample} (output {out}) needs "
            f"{human_bytes(io_bytes)} for {trials + 2} inputs and the conv's outputs, more than "
            f"the available memory ({human_bytes(available_memory())}); use a smaller input "
            f"shape or fewer trials"
        )
    weight = layer.weight.detach().to(dtype)
    bias = layer.bias.detach().to(dtype) if layer.bias is not None else None
    oracle = conv_module(spec, weight, bias, dtype)
    x = make_inputs(sample, trials, seed, dtype)
    expected = _quiet_forward(oracle, x)
    bad = [
        f"{int((~torch.isfinite(t)).sum())} in the {what}"
        for what, t in (("weight", weight), ("bias", bias))
        if t is not None and not bool(torch.isfinite(t).all())
    ]
    warning = f" (NaN/inf values: {', '.join(bad)})" if bad else ""
    return _LayerRun(
        layer, spec, weight, bias, sample, out, x, expected, tol, input_labels(trials),
        _budget(max_memory), seed, warning,
    )  # fmt: skip


def _too_big(need: int, budget: int) -> str:
    return f"needs {human_bytes(need)} > budget {human_bytes(budget)}"


def _sparse_need(nnz: int, rows: int, itemsize: int) -> int:
    return sizes.sparse_build_bytes(nnz, rows, itemsize)


def _io_bytes(run: _LayerRun) -> int:
    return (run.x.numel() + run.expected.numel()) * run.x.element_size() * 2


def _toeplitz_dense(run: _LayerRun) -> FormCheck:
    info = matrix_info(run.spec, run.sample, run.weight.dtype)
    need = info.dense_bytes + _io_bytes(run)
    if need > run.budget:
        return run.result(
            Form.TOEPLITZ_DENSE, SKIPPED, note=f"dense T {_too_big(need, run.budget)}"
        )
    t = matrix(run.spec, run.weight, run.sample)
    y = run.x.reshape(run.x.shape[0], -1) @ t.T + _bias(run)
    return run.judge(Form.TOEPLITZ_DENSE, y.reshape(run.expected.shape))


def _bias(run: _LayerRun) -> Tensor:
    return bias_vector_for(run.spec, run.bias, run.sample, run.weight.dtype)


def _toeplitz_sparse(run: _LayerRun) -> FormCheck:
    info = matrix_info(run.spec, run.sample, run.weight.dtype)
    need = _sparse_need(info.nnz, info.shape[0], info.itemsize) + _io_bytes(run)
    if need > run.budget:
        return _toeplitz_sampled(run, f"sparse T {_too_big(need, run.budget)}")
    t = matrix(run.spec, run.weight, run.sample, sparse=True, layout="csr")
    y = (t @ run.x.reshape(run.x.shape[0], -1).T).T + _bias(run)
    return run.judge(Form.TOEPLITZ_SPARSE, y.reshape(run.expected.shape))


def _toeplitz_sampled(run: _LayerRun, why: str) -> FormCheck:
    """Exact rows (conv) or columns (transposed) of a few channels, one channel at a time."""
    spec, k = run.spec, run.x.shape[0]
    per_channel = _template_bytes(run, k)
    room = (run.budget - _io_bytes(run)) // max(1, per_channel)
    fit = min(room, max(1, _SAMPLE_ENTRIES // _entries(run)), 8)
    if fit < 1:
        return run.result(
            Form.TOEPLITZ_SAMPLED, SKIPPED,
            note=f"{why}; even one channel's rows {_too_big(per_channel, run.budget)}",
        )  # fmt: skip
    gen = torch.Generator().manual_seed(run.seed + 1)
    if not spec.transposed:
        picks = torch.randperm(spec.out_channels, generator=gen)[:fit].sort().values
        actual = _sampled_rows(run, [int(c) for c in picks])
        expected = run.expected[:, picks]
        what = f"rows of {len(picks)} of {spec.out_channels} output channels ({_list(picks)})"
        return run.judge(Form.TOEPLITZ_SAMPLED, actual, f"{why}; checked the {what}", expected)
    # T = F^T: columns of T are rows of the forward matrix F, one per input channel.
    picks = torch.randperm(spec.in_channels, generator=gen)[:fit].sort().values
    mask = torch.zeros(spec.in_channels, dtype=torch.bool)
    mask[picks] = True
    x = run.x * mask.view(1, -1, *([1] * spec.ndim)).to(run.x.dtype)
    oracle = conv_module(spec, run.weight, run.bias, run.weight.dtype)
    expected = _quiet_forward(oracle, x)
    actual = _sampled_columns(run, x, [int(c) for c in picks])
    what = f"columns of {len(picks)} of {spec.in_channels} input channels ({_list(picks)})"
    note = f"{why}; checked the {what} on inputs zero elsewhere"
    return run.judge(Form.TOEPLITZ_SAMPLED, actual, note, expected)


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
    return (2 * weight + 2 * unfold) * item + _io_bytes(run)


def _lc(run: _LayerRun) -> FormCheck:
    if run.spec.transposed:
        return run.result(
            Form.LC, NOT_APPLICABLE, note="a transposed conv has no locally-connected form"
        )
    need = _lc_need(run)
    if need > run.budget:
        return run.result(Form.LC, SKIPPED, note=f"LC module {_too_big(need, run.budget)}")
    return _module_form(run, Form.LC, lambda conv: convert.to_locally_connected(conv, run.sample))


def _fc(run: _LayerRun, sparse: bool) -> FormCheck:
    form = Form.FC_SPARSE if sparse else Form.FC_DENSE
    info = matrix_info(run.spec, run.sample, run.weight.dtype)
    sparse_need = _sparse_need(info.nnz, info.shape[0], info.itemsize)
    need = (sparse_need if sparse else 2 * info.dense_bytes) + _io_bytes(run)
    if need > run.budget:
        return run.result(form, SKIPPED, note=f"FC module {_too_big(need, run.budget)}")
    return _module_form(
        run, form, lambda conv: convert.to_fully_connected(conv, run.sample, sparse=sparse)
    )


def _module_form(run: _LayerRun, form: str, build: Callable[[nn.Module], nn.Module]) -> FormCheck:
    conv = conv_module(run.spec, run.weight, run.bias, run.weight.dtype)
    try:
        candidate = build(conv)
    except ConvtoolError as exc:  # e.g. a converter refusing NaN weights: not a pass
        return run.result(form, FAILED, note=f"building the {form} form failed: {exc}")
    actual = _quiet_forward(candidate.eval(), run.x)
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
def _flatten_outputs(out: Any) -> Tensor:
    """All tensors of a (nested) model output, flattened and concatenated in order."""
    leaves: list[Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            leaves.append(value.detach().reshape(-1))
        elif isinstance(value, dict):
            for key in value:
                walk(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(out)
    if not leaves:
        raise ConvtoolError(f"the model returned no tensor (got {type(out).__name__})")
    return torch.cat([t.to(torch.float64) if t.is_floating_point() else t for t in leaves])


def _run_model(model: nn.Module, inputs: Tensor) -> Tensor:
    """Outputs for each example input `(K, *example_shape)`: `(K, numel of one output)`."""
    try:
        return torch.stack([_flatten_outputs(_quiet_forward(model, x)) for x in inputs])
    except ConvtoolError:
        raise
    except Exception as exc:
        raise ConvtoolError(
            f"running the model on an input of shape {tuple(inputs.shape[1:])} failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


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
) -> list[FormCheck]:
    """The converted model against the original, on inputs of the example's shape (end to end).

    Each form converts a copy with :func:`convtool.models.convert_with_report`; convs it leaves
    unconverted (functional calls, convs not called, transposed convs for 'lc') are named in the
    check's note, since the comparison says nothing about them.

    Args:
        model: any eager module (or exported GraphModule); a copy in `dtype` and eval mode is
            converted, `model` itself is untouched. TorchScript modules cannot be converted: their
            checks are skipped.
        example_shape: the full example input including batch, e.g. `(1, 3, 32, 32)`.
        layers: names of the convs to convert (default: all).
        Others: as :func:`check_layer`.

    Returns:
        One :class:`FormCheck` per name in :func:`model_form_names(to) <model_form_names>`.
    """
    dtype = parse_dtype(dtype)
    _check_counts(trials, seed)
    tol = resolve_tolerance(dtype, rtol, atol)
    shape = tuple(int(s) for s in example_shape)
    forms = model_form_names(to)
    checks: list[FormCheck] = []
    if isinstance(model, torch.jit.ScriptModule):
        why = "a TorchScript module cannot be converted; verify its eager model or .pt2 export"
        checks = [FormCheck(MODEL_NAME, f, SKIPPED, input_shape=shape, note=why) for f in forms]
    else:
        with warnings.catch_warnings():  # deep-copying exported GraphModules warns about pytree
            warnings.simplefilter("ignore")
            reference = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        inputs = make_inputs(shape, trials, seed, dtype)
        run = _ModelRun(reference, shape, inputs, _run_model(reference, inputs), tol,
                        input_labels(trials), layers, _budget(max_memory))  # fmt: skip
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
    reference: nn.Module
    shape: tuple[int, ...]
    inputs: Tensor
    expected: Tensor
    tol: Tolerance
    labels: list[str]
    layers: Sequence[str] | None
    budget: int

    def result(self, form: str, status: str, **kwargs: Any) -> FormCheck:
        out = tuple(self.expected.shape[1:])
        return FormCheck(MODEL_NAME, form, status, input_shape=self.shape, output_shape=out,
                         **kwargs)  # fmt: skip


def _model_need(run: _ModelRun, form: str, names: set[str]) -> int:
    """Bytes the converted convs need (dense T, or sparse T which bounds the LC weights too)."""
    shapes = models.capture(run.reference, run.shape).input_shapes
    total = 0
    for name in names & set(shapes):
        spec = ConvSpec.from_module(run.reference.get_submodule(name))
        info = matrix_info(spec, shapes[name], run.inputs.dtype)
        if form == Form.FC_DENSE:
            total += 2 * info.dense_bytes
        else:
            total += _sparse_need(info.nnz, info.shape[0], info.itemsize)
    return total


def _model_form(run: _ModelRun, form: str) -> FormCheck:
    names = set(run.layers) if run.layers is not None else _conv_names(run.reference)
    to = ModelTarget.LC if form == Form.LC else ModelTarget.FC
    sparse = form == Form.FC_SPARSE
    kept = _transposed_names(run.reference, names) if to == ModelTarget.LC else []
    names -= set(kept)
    notes = [f"transposed convs have no LC form, kept: {', '.join(kept)}"] if kept else []
    if not names:
        return run.result(form, NOT_APPLICABLE, note="; ".join(notes) or "no conv to convert")
    need = _model_need(run, form, names)
    if need > run.budget:
        return run.result(form, SKIPPED, note=f"converted model {_too_big(need, run.budget)}")
    try:
        converted, conversion = _convert_model(run, to, sparse, names)
    except ConvtoolError as exc:
        return run.result(form, FAILED, note=f"converting the model failed: {exc}")
    notes.insert(0, f"{len(conversion.layers)} conv(s) converted")
    notes.extend(conversion.warnings())
    actual = _run_model(converted.eval(), run.inputs)
    cmp = compare(run.expected, actual, run.tol.rtol, run.tol.atol, tolerance_source=run.tol.source)
    worst = run.labels[cmp.worst_index[0]] if cmp.worst_index is not None else None
    if cmp.nonfinite:
        notes.append(f"{cmp.nonfinite} output value(s) hold NaN/inf")
    status = PASSED if cmp.passed else FAILED
    note = "; ".join(n for n in (*notes, cmp.note) if n)
    return run.result(form, status, comparison=cmp, worst_input=worst, note=note)


def _convert_model(run: _ModelRun, to: str, sparse: bool, names: set[str]) -> tuple[nn.Module, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what matters is in the conversion report
        return models.convert_with_report(
            run.reference, run.shape, to=to, sparse=sparse, layers=sorted(names),
            memory_limit=run.budget,
        )  # fmt: skip


def _conv_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if is_conv(m)}


def _transposed_names(model: nn.Module, names: set[str]) -> list[str]:
    return sorted(
        name
        for name, m in model.named_modules()
        if name in names and is_conv(m) and ConvSpec.from_module(m).transposed
    )


# ---------------------------------------------------------------------------------- front doors
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
    advance: Advance | None = None,
) -> VerifyReport:
    """Check `layers` (each with its one-sample input shape) and, given a model, end to end.

    The end-to-end comparison converts only the listed layers. See :func:`check_layer` and
    :func:`check_model` for the arguments.
    """
    dtype = parse_dtype(dtype)
    _check_counts(trials, seed)
    tol = resolve_tolerance(dtype, rtol, atol)
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
        e2e = check_model(model, example_shape, layers=names, **kwargs)
    elif model is None and end_to_end and example_shape is not None:
        notes.append("no end-to-end comparison: the source has no model, only conv layers")
    return VerifyReport(
        checks=checks,
        end_to_end=e2e,
        dtype=str(dtype).removeprefix("torch."),
        tolerance=tol,
        inputs=input_labels(trials),
        trials=trials,
        seed=seed,
        notes=notes,
    )


def model_layers(
    model: nn.Module, example_shape: Sequence[int]
) -> tuple[list[tuple[ConvLayer, tuple[int, ...]]], list[str]]:
    """(layer, one-sample input shape) for every conv the model calls on `example_shape`, and
    notes on the convs that cannot be checked alone (not called, called on several shapes)."""
    cap = models.capture(model, tuple(int(s) for s in example_shape))
    pairs, notes = [], []
    for name, module in model.named_modules():
        if not is_conv(module):
            continue
        if name not in cap.input_shapes:
            notes.append(f"conv {name!r} is not called on the example input: not checked")
        elif name in cap.conflicts:
            seen = ", ".join(str(s) for s in cap.conflicts[name])
            notes.append(f"conv {name!r} is called on several input shapes ({seen}): not checked")
        else:
            weight: Any = module.weight
            spec = ConvSpec.from_module(module)
            bias = getattr(module, "bias", None)
            shape = cap.input_shapes[name]
            pairs.append((ConvLayer(name, spec, weight, bias, shape, module), shape))
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
    advance: Advance | None = None,
) -> VerifyReport:
    """Prove numerically that convtool's forms compute what the conv (or model) computes.

    Args:
        target: a conv layer (`nn.Conv*d`, `nn.ConvTranspose*d`, a
            :class:`~convtool.io.source.ConvLayer`) or any model containing convs.
        input_shape: for a conv, one sample `(C_in, *spatial)` (a leading batch is accepted);
            for a model, the full example input including batch, e.g. `(1, 3, 32, 32)`.
        to: 'toeplitz', 'lc', 'fc' or 'all' (default).
        dtype: float32 or float64 (default); the oracle and the forms both run in it.
        trials: seeded standard-normal inputs, besides an all-ones and a zero input.
        seed: seed of the random inputs.
        rtol, atol: both or neither; neither -> `torch.testing.assert_close`'s defaults for
            `dtype` (float32: 1.3e-6 / 1e-5, float64: 1e-7 / 1e-7).
        layers: for a model, glob pattern(s) of the conv names to check (and to convert end to
            end); default all.
        max_memory: bytes any one form may use (default: the machine's available memory).
        end_to_end: for a model, also compare the whole converted model with the original.
        advance: called with each :class:`FormCheck` as it completes.

    Returns:
        A :class:`VerifyReport`; `bool(report)` is `report.passed`.

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
        found, notes = model_layers(target, example)
        if not found:
            raise ConvtoolError(f"{type(target).__name__} calls no conv layer on input {example}")
        pattern = layers if layers is None or isinstance(layers, str) else ",".join(layers)
        chosen = set(models.select_layers([layer.name for layer, _ in found], pattern))
        pairs = [(layer, shape) for layer, shape in found if layer.name in chosen]
        model = target
    else:
        raise ConvtoolError(f"verify() takes a conv layer or a model, got {type(target).__name__}")
    report = verify_layers(
        pairs, model=model, example_shape=example, to=to, dtype=dtype, trials=trials,
        seed=seed, rtol=rtol, atol=atol, max_memory=max_memory, end_to_end=end_to_end,
        advance=advance,
    )  # fmt: skip
    report.notes[:0] = notes
    return report
