"""Rewrite the Conv / ConvTranspose nodes of any ONNX model into LC or FC subgraphs.

The rest of the graph is kept node for node, so whatever produced the model (torch.onnx.export,
another framework, a file from a model zoo) keeps its pads, pooling and heads. Each conv's
one-sample input shape comes from ONNX shape inference; the batch dimension may be symbolic.
Everything is planned and size-checked before any matrix is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from convtool.errors import ConvtoolError
from convtool.export import onnx_forms as forms
from convtool.forms import model_target
from convtool.resources import check_memory, human_bytes
from convtool.spec import ConvSpec

# protobuf cannot serialise a message over 2 GiB; ONNX files with more need external data.
PROTO_LIMIT = 2**31 - 1


def opset_of(model: Any) -> int:
    """The default-domain opset a model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def constants(model: Any) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of the main graph, as numpy arrays."""
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def shapes(model: Any) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's shape ONNX shape inference knows (None for a symbolic dim)."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # a malformed model: say so in one line
        raise ConvtoolError(
            f"ONNX shape inference failed: {str(exc).splitlines()[0][:200]}"
        ) from None
    graph = inferred.graph
    found: dict[str, tuple[int | None, ...]] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        t = info.type.tensor_type
        if t.HasField("shape"):
            found[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
            )
    for init in graph.initializer:
        found[init.name] = tuple(init.dims)
    return found


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class ConvNode:
    """One Conv/ConvTranspose node, read and planned.

    Attributes:
        index: position in the graph's node list.
        name: the layer name (the weight's name without '.weight', else the node's name).
        transposed: ConvTranspose.
        weight / bias: arrays (bias may be None).
        sample: one input sample `(C_in, *spatial)`.
        window: its zero-padded geometry.
        spec: the equivalent PyTorch conv (padding symmetric; asymmetric pads go to a Pad).
        out_shape: one output sample.
        nbytes: what its new form stores (an estimate made without building it).
    """

    index: int
    name: str
    transposed: bool
    weight: np.ndarray
    bias: np.ndarray | None
    sample: tuple[int, ...]
    window: forms.Window
    spec: ConvSpec
    out_shape: tuple[int, ...]
    nbytes: int = 0


def _same_pads(
    auto_pad: str,
    sizes: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    begin, end = [], []
    for n, k, s, d in zip(sizes, kernel, stride, dilation, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begin.append(lo)
        end.append(total - lo)
    return (*begin, *end)


def read_conv(
    model: Any,
    index: int,
    consts: dict[str, np.ndarray],
    known: dict[str, tuple[int | None, ...]],
) -> ConvNode:
    """A Conv node's weights and geometry; refuses what has no exact matrix here."""
    node = model.graph.node[index]
    label = node.name or node.output[0]
    transposed = node.op_type == "ConvTranspose"
    if node.input[1] not in consts:
        raise ConvtoolError(
            f"{node.op_type} node {label!r} has a computed weight; it cannot be "
            f"written as a fixed matrix"
        )
    weight = consts[node.input[1]]
    bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and bias is None:
        raise ConvtoolError(f"{node.op_type} node {label!r} has a computed bias")
    shape = known.get(node.input[0])
    if shape is None or len(shape) < 3 or any(s is None for s in shape[1:]):
        raise ConvtoolError(
            f"the input shape of {node.op_type} node {label!r} is not known ({shape}); give the "
            f"model fixed sizes except the batch"
        )
    sample = tuple(int(s) for s in shape[1:])  # type: ignore[arg-type]
    ndim = weight.ndim - 2
    a = _attrs(node)
    kernel = tuple(a.get("kernel_shape", weight.shape[2:]))
    stride = tuple(a.get("strides", (1,) * ndim))
    dilation = tuple(a.get("dilations", (1,) * ndim))
    groups = int(a.get("group", 1))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and not transposed:
        pads = _same_pads(auto_pad, sample[1:], kernel, stride, dilation)
    elif auto_pad in ("NOTSET", "VALID"):
        pads = (
            tuple(a.get("pads", (0,) * (2 * ndim))) if auto_pad == "NOTSET" else (0,) * (2 * ndim)
        )
    else:
        raise ConvtoolError(f"{node.op_type} node {label!r}: auto_pad={auto_pad} is not supported")
    c_in = weight.shape[0] if transposed else weight.shape[1] * groups
    c_out = weight.shape[1] * groups if transposed else weight.shape[0]
    if transposed and ("output_shape" in a or pads[:ndim] != pads[ndim:]):
        raise ConvtoolError(
            f"ConvTranspose node {label!r}: output_shape or asymmetric pads are not supported"
        )
    symmetric = pads[:ndim] == pads[ndim:]
    spec = ConvSpec.create(
        ndim,
        int(c_in),
        int(c_out),
        kernel,
        stride=stride,
        padding=pads[:ndim] if symmetric else 0,
        dilation=dilation,
        groups=groups,
        transposed=transposed,
        output_padding=tuple(a.get("output_padding", (0,) * ndim)),
        bias=bias is not None,
    )
    window = forms.Window(sample, kernel, stride, dilation, pads, groups)
    fc_sample = sample if symmetric else (sample[0], *window.padded)
    out_shape = spec.output_shape(fc_sample)
    name = node.input[1].removesuffix(".weight") if node.input[1].endswith(".weight") else label
    return ConvNode(index, name, transposed, weight, bias, sample, window, spec, out_shape)


def _estimate(conv: ConvNode, to: str, sparse: bool) -> int:
    from convtool.matrices import matrix_info

    itemsize = conv.weight.dtype.itemsize
    if to == "lc":
        return forms.lc_bytes(conv.window, conv.spec.out_channels, itemsize, conv.bias is not None)
    sample = (
        conv.sample
        if conv.window.pads[: conv.spec.ndim] == conv.window.pads[conv.spec.ndim :]
        else (conv.sample[0], *conv.window.padded)
    )
    info = matrix_info(conv.spec, sample, torch.float32 if itemsize == 4 else torch.float64)
    if sparse:  # COO while building; ELL pads at most ELL_SLACK (else the scatter form)
        return int(info.nnz * (itemsize + 16) * forms.ELL_SLACK)
    return info.shape[0] * info.shape[1] * itemsize


def plan_convs(
    model: Any,
    to: str,
    sparse: bool,
    layers: str | None = None,
    memory_limit: int | None = None,
) -> list[ConvNode]:
    """Read, select and size-check every conv to rewrite; builds nothing.

    Raises:
        ConvtoolError: a conv that cannot be rewritten, `to='lc'` for a ConvTranspose, or forms
            that would not fit in memory or in one ONNX file.
    """
    from convtool.inventory import select as select_layers

    to = model_target(to, sparse)
    if opset_of(model) < 13:
        raise ConvtoolError(
            f"the ONNX model imports opset {opset_of(model)}; the LC/FC forms "
            f"need opset 13 or later"
        )
    indices = [i for i, n in enumerate(model.graph.node) if n.op_type in ("Conv", "ConvTranspose")]
    if not indices:
        raise ConvtoolError("the ONNX model has no Conv or ConvTranspose node")
    consts, known = constants(model), shapes(model)
    convs = [read_conv(model, i, consts, known) for i in indices]
    chosen = set(select_layers([c.name for c in convs], layers))
    convs = [c for c in convs if c.name in chosen]
    for conv in convs:
        if to == "lc" and conv.transposed:
            raise ConvtoolError(
                f"layer {conv.name!r} is a ConvTranspose, which has no "
                f"locally-connected form; use to='fc'",
                params=("to",),
            )
        conv.nbytes = _estimate(conv, to, sparse)
    if convs:
        biggest = max(convs, key=lambda c: c.nbytes)
        form = {"lc": "locally-connected", "fc": "sparse FC" if sparse else "dense FC"}[to]
        check_memory(
            sum(c.nbytes for c in convs) + biggest.nbytes,
            f"the {form} ONNX form of {len(convs)} conv(s) (largest: {biggest.name!r})",
            "use sparse=True or to='lc', or convert fewer `layers`",
            memory_limit,
            params=("sparse", "to", "layers"),
        )
        kept = sum(v.nbytes for k, v in consts.items())
        total = kept + sum(c.nbytes for c in convs)
        if total > PROTO_LIMIT:
            raise ConvtoolError(
                f"the {form} ONNX model would hold about {human_bytes(total)} of tensors, over "
                f"the 2 GiB limit of one ONNX file; use sparse=True or convert fewer `layers`",
                params=("sparse", "layers"),
            )
    return convs


def rewrite_onnx_convs(
    model: Any,
    to: str = "fc",
    sparse: bool = False,
    *,
    layers: str | None = None,
    sparse_form: str = "auto",
    memory_limit: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """A copy of an ONNX model with its Conv (and, for 'fc', ConvTranspose) nodes replaced.

    Args:
        model: an `onnx.ModelProto`; every conv input needs a known shape apart from the batch.
        to: 'lc' (gathered windows and one batched MatMul) or 'fc' (the matrix `T`).
        sparse: for 'fc', the sparse form (Gather, Mul and a per-row sum) instead of a Gemm.
        layers: which convs (names or globs, comma-separated); a conv's name is its weight's
            name without '.weight' (PyTorch module paths for exported models), else its node's.
        sparse_form: 'auto', 'ell' (ReduceSum over padded rows) or 'scatter' (ScatterND add).
        memory_limit: bytes the new forms may take (default: available memory).
        advance: called with 1 per rewritten conv (a progress bar).

    Returns:
        (the new model, one dict per rewritten conv: name, op, form, input/output shape, bytes).
    """
    import onnx

    convs = plan_convs(model, to, sparse, layers, memory_limit)
    if sparse_form not in ("auto", "ell", "scatter"):
        raise ConvtoolError(f"sparse_form must be 'auto', 'ell' or 'scatter', got {sparse_form!r}")
    if opset_of(model) < 16 and sparse_form == "scatter":
        raise ConvtoolError("sparse_form='scatter' needs opset 16 or later (ScatterND add)")
    if opset_of(model) < 16:
        sparse_form = "ell"
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    replaced: dict[int, list[Any]] = {}
    new_inits: list[Any] = []
    report = []
    for k, conv in enumerate(convs):
        node = graph.node[conv.index]
        b = forms.Builder(prefix=f"convtool/{conv.name or k}")
        dtype = conv.weight.dtype
        x = node.input[0]
        if to == "lc":
            y = forms.locally_connected(b, x, conv.window, conv.weight, conv.bias, dtype)
            form = "lc"
        else:
            nd = conv.spec.ndim
            sample = conv.sample
            if conv.window.pads[:nd] != conv.window.pads[nd:]:
                pads = np.array([0, 0, *conv.window.pads[:nd], 0, 0, *conv.window.pads[nd:]])
                x = b.op("Pad", [x, b.const("pads", pads.astype(np.int64))], mode="constant")
                sample = (sample[0], *conv.window.padded)
            from convtool.matrices import bias_vector_for, matrix

            weight = torch.from_numpy(np.array(conv.weight))
            t = matrix(conv.spec, weight, sample, sparse=sparse, layout="coo")
            bias = None
            if conv.bias is not None:
                bias = bias_vector_for(
                    conv.spec, torch.from_numpy(np.array(conv.bias)), sample, weight.dtype
                )
            if sparse:
                rows = t.coalesce().indices()[0].numpy()
                form = forms.sparse_form(rows, t.shape[0], sparse_form)
                y = forms.sparse_fc(b, x, t, bias, conv.out_shape, dtype, form)
                form = f"fc-sparse-{form}"
            else:
                y = forms.dense_fc(b, x, t, bias, conv.out_shape, dtype)
                form = "fc"
            del t
        last = b.nodes[-1]
        assert last.output[0] == y
        last.output[0] = node.output[0]
        replaced[conv.index] = b.nodes
        new_inits.extend(b.initializers)
        report.append(
            {
                "name": conv.name,
                "op": node.op_type,
                "form": form,
                "input_shape": list(conv.sample),
                "output_shape": list(conv.out_shape),
                "bytes": sum(len(i.raw_data) for i in b.initializers),
            }
        )
        if advance is not None:
            advance(1)
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replaced.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _drop_unused(graph)
    return out, report


def _drop_unused(graph: Any) -> None:
    """Remove initializers no node reads any more (the replaced convs' weights)."""
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
