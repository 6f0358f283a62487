"""PyTorch model -> ONNX in one call: checks first, then the plain export, then the rewrite.

Order of work (every refusal comes before the next step): the cheap checks on the model
(sizes of the forms from one traced forward pass, non-linear ops for a fold), the plain
`torch.onnx.export` (seconds), the rewrite or fold plan (size-checked again on the exact
graph), and only then the matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from convtool.errors import ConvtoolError
from convtool.export import precheck
from convtool.export.fold import FoldedNetwork, fold_onnx
from convtool.export.onnx_convs import rewrite_onnx_convs
from convtool.export.torch_onnx import DEFAULT_OPSET, export_onnx, require_onnx
from convtool.forms import model_target
from convtool.resources import check_memory
from convtool.spec import ConvSpec, is_conv


def check_forms(
    model: nn.Module,
    example_shape: Sequence[int],
    to: str,
    sparse: bool,
    layers: str | None,
    memory_limit: int | None,
) -> None:
    """Refuse LC/FC forms that would not fit in memory, from a traced pass (no matrix built)."""
    from convtool.inventory import select as select_layers
    from convtool.models import _estimate_bytes, capture

    if isinstance(model, nn.Module) and not hasattr(model, "_c"):  # not TorchScript
        cap = capture(model, example_shape)
        convs = {n: m for n, m in model.named_modules() if is_conv(m)}
        total = 0
        for name in select_layers(list(convs), layers):
            shape = cap.input_shapes.get(name)
            if shape is None:
                continue
            spec = ConvSpec.from_module(convs[name])
            if to == "lc" and spec.transposed:
                raise ConvtoolError(
                    f"layer {name!r} is a {spec.kind}, which has no "
                    f"locally-connected form; use to='fc'",
                    params=("to",),
                )
            weight: Any = convs[name].weight
            total += _estimate_bytes(spec, shape, to, sparse, weight.element_size())
        check_memory(
            total,
            f"the {to} form of the model's convs",
            "use sparse=True or to='lc', or convert fewer `layers`",
            memory_limit,
            params=("sparse", "to", "layers"),
        )


def model_to_onnx(
    model: nn.Module | Any,
    example_shape: Sequence[int],
    *,
    to: str = "fc",
    sparse: bool = False,
    layers: str | None = None,
    opset: int = DEFAULT_OPSET,
    sparse_form: str = "auto",
    memory_limit: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """A model with its convs in LC / FC form, as an `onnx.ModelProto` (dynamic batch).

    Args:
        model: an eager module, TorchScript-free GraphModule, or ExportedProgram.
        example_shape: the full input `(N, C, *spatial)` the convs' shapes come from.
        to, sparse, layers, sparse_form: as in :func:`~convtool.export.rewrite_onnx_convs`.
        opset: ONNX opset (16 or later).
        memory_limit: bytes the forms may take (default: available memory).

    Returns:
        (the model, one dict per rewritten conv).
    """
    require_onnx()
    to = model_target(to, sparse)
    if isinstance(model, nn.Module):
        check_forms(model, example_shape, to, sparse, layers, memory_limit)
    plain = export_onnx(model, example_shape, opset=opset)
    return rewrite_onnx_convs(
        plain,
        to,
        sparse,
        layers=layers,
        sparse_form=sparse_form,
        memory_limit=memory_limit,
        advance=advance,
    )


def fold_model(
    model: nn.Module | Any,
    example_shape: Sequence[int],
    *,
    sparse: bool = False,
    opset: int = DEFAULT_OPSET,
    memory_limit: int | None = None,
    for_onnx: bool = True,
    advance: Callable[[int], None] | None = None,
) -> FoldedNetwork:
    """A model as affine layers between ReLUs (see :func:`~convtool.export.fold_onnx`).

    Non-linear ops (max pooling, other activations) and dense layers too big are refused from
    one forward pass on a zero sample, before the model is exported.
    """
    require_onnx()
    if isinstance(model, nn.Module):
        scan = precheck.scan_model(model, example_shape)
        precheck.check_foldable(scan)
        if not sparse:
            param = next((p for p in model.parameters() if p.is_floating_point()), None)
            itemsize = param.element_size() if param is not None else 4
            precheck.check_fold_size(scan, itemsize, memory_limit, for_onnx)
    plain = export_onnx(model, example_shape, opset=opset)
    return fold_onnx(
        plain, sparse=sparse, memory_limit=memory_limit, for_onnx=for_onnx, advance=advance
    )
