"""Verify the forms of ONNX conv nodes against the node itself.

The oracle is the node run alone by onnxruntime (a test extra; float32 only). Its attributes
are also turned into torch's own conv (pre-pad, conv, crop: :func:`convtool.onnx_graph.
reference_forward`), which is checked against onnxruntime first (form 'onnx_node'). Without
onnxruntime that torch conv is the oracle, and the note says so. In float64 the forms are
compared with the float64 torch conv (onnxruntime cannot run float64 convs), itself checked
against onnxruntime in float32.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from convtool.compare import compare, parse_dtype, resolve_tolerance
from convtool.convert import to_locally_connected
from convtool.forms import Form
from convtool.inventory import ConvLayer, layer_bias_vector, layer_matrix, layer_output_shape
from convtool.layers import FullyConnected
from convtool.onnx_graph import reference_forward, run_node
from convtool.spec import build_conv
from convtool.verification import (
    FAILED,
    NOT_APPLICABLE,
    PASSED,
    FormCheck,
    VerifyReport,
    input_labels,
    make_inputs,
)

__all__ = ["verify_onnx_layers"]

FORMS = (Form.ONNX_NODE, Form.TOEPLITZ_DENSE, Form.TOEPLITZ_SPARSE, Form.FC_DENSE, Form.LC)


def _check(
    name: str,
    form: str,
    expected: Tensor,
    actual: Tensor,
    rtol: float,
    atol: float,
    source: str,
    layer: ConvLayer,
    sample: tuple[int, ...],
    labels: list[str],
    note: str,
    started: float,
) -> FormCheck:
    cmp = compare(expected, actual, rtol, atol, tolerance_source=source)
    worst = labels[cmp.worst_index[0]] if cmp.worst_index is not None else None
    return FormCheck(
        name,
        form,
        PASSED if cmp.passed else FAILED,
        comparison=cmp,
        layer=layer.spec.describe(),
        input_shape=sample,
        output_shape=layer_output_shape(layer, sample),
        worst_input=worst,
        note="; ".join(n for n in (note, cmp.note) if n),
        seconds=time.perf_counter() - started,
    )


class _PadThen(nn.Module):
    """Zero pre-padding, then a module (the LC form of an asymmetrically padded node)."""

    def __init__(self, pads: list[int], inner: nn.Module) -> None:
        super().__init__()
        self.pads, self.inner = pads, inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(torch.nn.functional.pad(x, self.pads))


def _float32_atol(layer: ConvLayer, x: Tensor) -> float:
    """What float32 accumulation may differ by between two correct conv implementations."""
    taps = layer.spec.in_channels // layer.spec.groups * layer.spec.kernel_numel
    scale = float(layer.weight.abs().max()) * float(x.abs().max())
    bias = float(layer.bias.abs().max()) if layer.bias is not None else 0.0
    return max(1e-5, 4 * torch.finfo(torch.float32).eps * (taps * scale + bias))


def verify_onnx_layers(
    layers: Sequence[tuple[ConvLayer, Sequence[int]]],
    *,
    opset: int,
    dtype: torch.dtype | str = torch.float64,
    trials: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerifyReport:
    """Check every form of each ONNX node (with its one-sample input) against the node.

    Args:
        layers: (layer, one-sample input `(C_in, *spatial)`) pairs from an ONNX source.
        opset: the model's opset (the node is run alone at it).
        dtype, trials, seed, rtol, atol: as :func:`convtool.verify`.
    """
    dtype = parse_dtype(dtype)
    tol = resolve_tolerance(dtype, rtol, atol)
    f32 = resolve_tolerance(torch.float32, None, None)  # rtol; atol from the rounding bound
    labels = input_labels(trials)
    checks: list[FormCheck] = []
    notes: list[str] = []
    ort_missing = False
    for layer, shape in layers:
        sample = tuple(int(s) for s in shape)
        x = make_inputs(sample, trials, seed, dtype)
        started = time.perf_counter()
        reference = reference_forward(layer, x)
        node_out = run_node(layer, x.float(), opset) if layer.origin is not None else None
        if node_out is None:
            ort_missing = True
            oracle, source_note = reference, ""
        else:
            checks.append(
                _check(
                    layer.name,
                    Form.ONNX_NODE,
                    node_out,
                    reference.float(),
                    f32.rtol,
                    _float32_atol(layer, x),
                    "float32 rounding bound: 4 * eps * taps * max|w| * max|x|",
                    layer,
                    sample,
                    labels,
                    "",
                    started,
                )
            )
            oracle = node_out.to(dtype) if dtype == torch.float32 else reference
            source_note = ""
        flat = x.reshape(x.shape[0], -1)
        out_shape = (x.shape[0], *layer_output_shape(layer, sample))
        b = layer_bias_vector(layer, sample, dtype)
        weighted = ConvLayer(
            layer.name,
            layer.spec,
            layer.weight.to(dtype),
            None if layer.bias is None else layer.bias.to(dtype),
            pre_pad=layer.pre_pad,
            post_crop=layer.post_crop,
        )

        def judge(
            form: str,
            y: Tensor,
            started: float,
            layer: ConvLayer = layer,
            oracle: Tensor = oracle,
            sample: tuple[int, ...] = sample,
            note: str = source_note,
        ) -> FormCheck:
            return _check(
                layer.name, form, oracle, y, tol.rtol, tol.atol, tol.source, layer, sample,
                labels, note, started,
            )  # fmt: skip

        for form in (Form.TOEPLITZ_DENSE, Form.TOEPLITZ_SPARSE):
            started = time.perf_counter()
            t = layer_matrix(weighted, sample, sparse=form == Form.TOEPLITZ_SPARSE)
            y = (t @ flat.T).T if t.layout != torch.strided else flat @ t.T
            checks.append(judge(form, (y + b).reshape(out_shape), started))
            if form == Form.TOEPLITZ_DENSE:  # the FC module holds this same T
                started = time.perf_counter()
                fc = FullyConnected(sample, out_shape[1:], t, b, copy=False)
                with torch.no_grad():
                    checks.append(judge(Form.FC_DENSE, fc(x), started))
                del fc
        started = time.perf_counter()
        if layer.spec.transposed:
            checks.append(
                FormCheck(
                    layer.name,
                    Form.LC,
                    NOT_APPLICABLE,
                    layer=layer.spec.describe(),
                    input_shape=sample,
                    note="a transposed conv has no locally-connected form",
                )
            )
            continue
        conv = build_conv(layer.spec, weighted.weight, weighted.bias)
        padded = tuple(int(s) for s in x.shape[1:])
        pads: list[int] = []
        if layer.pre_pad is not None:
            pads = [p for pair in reversed(layer.pre_pad) for p in pair]
            padded = (
                padded[0],
                *(n + lo + hi for n, (lo, hi) in zip(padded[1:], layer.pre_pad, strict=True)),
            )
        lc: nn.Module = to_locally_connected(conv, padded)
        if pads:
            lc = _PadThen(pads, lc)
        with torch.no_grad():
            y = lc(x)
        checks.append(judge(Form.LC, y, started))
    notes.append(
        "onnx_node: torch's conv built from each node's attributes against the node run alone by "
        "onnxruntime (float32, tolerance from the float32 rounding bound); the other forms "
        + (
            "against onnxruntime's output"
            if dtype == torch.float32
            else f"against that torch conv in {str(dtype).removeprefix('torch.')}"
        )
    )
    if ort_missing:
        notes.append(
            "onnxruntime is not installed (or cannot run a node): the oracle is torch's conv "
            "built from each node's attributes"
        )
    return VerifyReport(
        checks=checks,
        end_to_end=[],
        dtype=str(dtype).removeprefix("torch."),
        tolerance=tol,
        inputs=labels,
        trials=trials,
        seed=seed,
        notes=notes,
    )
