"""An ONNX graph as its conv calls: every `Conv` and `ConvTranspose` node, read without running.

Each node becomes a :class:`~convtool.inventory.ConvLayer` named after the node (`node.name`, or
`Conv_3` for the 4th node of an unnamed graph; a node inside an `If`/`Loop`/`Scan` body is
`PARENT/ATTRIBUTE/NAME`, e.g. `if_0/then_branch/conv`). Everything ONNX can say is taken:

- weights and biases from initializers or `Constant` nodes, in the node's graph or any graph
  around it; a weight computed in the graph leaves the node unconverted, with a note;
- `strides`, `dilations`, `group`, `kernel_shape`, `pads`, `auto_pad` (NOTSET, VALID,
  SAME_UPPER, SAME_LOWER), and for ConvTranspose `output_padding` and `output_shape`;
- input shapes from `onnx.shape_inference`; a full example input fixes the graph input's
  symbolic dims first.

PyTorch's convs take symmetric padding only. Asymmetric pads are exact all the same: a conv is
the zero-padding map followed by an unpadded conv (`pre_pad`, so `T` is a column subset of the
unpadded conv's matrix on the padded input); a transposed conv computes a larger output and
crops it (`post_crop`, a row subset). :func:`convtool.inventory.layer_matrix` applies both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from convtool.errors import ConvtoolError
from convtool.inventory import ConvLayer
from convtool.spec import ConvSpec, build_conv

__all__ = ["OnnxGraph", "onnx_layers", "reference_forward", "run_node"]

CONV_OPS = ("Conv", "ConvTranspose")


@dataclass
class OnnxGraph:
    """What an ONNX source keeps: the model, its conv nodes, the example input they fit.

    Attributes:
        model: the `onnx.ModelProto`.
        input_name: the graph input the example shape applies to.
        input_shape: its dims as stored (ints; strings for symbolic dims).
        opset: the default-domain opset version.
    """

    model: Any
    input_name: str
    input_shape: tuple[int | str, ...]
    opset: int


def _tensor(proto: Any) -> Tensor:
    from onnx import numpy_helper

    array = numpy_helper.to_array(proto)
    t = torch.from_numpy(array.copy())
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _graphs(graph: Any, prefix: str = "") -> Iterator[tuple[str, Any, list[Any]]]:
    """(name prefix, graph, its nodes) for `graph` and every subgraph, outer graphs first."""
    yield prefix, graph, list(graph.node)
    for i, node in enumerate(graph.node):
        label = node.name or f"{node.op_type}_{i}"
        for attr in node.attribute:
            subs = [attr.g] if attr.type == 5 else list(attr.graphs) if attr.type == 10 else []
            for j, sub in enumerate(subs):
                tail = attr.name if len(subs) == 1 else f"{attr.name}{j}"
                yield from _graphs(sub, f"{prefix}{label}/{tail}/")


def _constants(model: Any) -> dict[str, Any]:
    """Every initializer and Constant node output in the model, by value name."""
    found: dict[str, Any] = {}
    for _, graph, nodes in _graphs(model.graph):
        for init in graph.initializer:
            found.setdefault(init.name, init)
        for node in nodes:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == 4:
                        found.setdefault(node.output[0], attr.t)
    return found


def _shapes(model: Any) -> dict[str, tuple[int | None, ...]]:
    """Value name -> its inferred shape (None for unknown dims)."""
    out: dict[str, tuple[int | None, ...]] = {}
    for _, graph, _ in _graphs(model.graph):
        for info in [*graph.input, *graph.value_info, *graph.output]:
            t = info.type.tensor_type
            if not t.HasField("shape"):
                continue
            out.setdefault(
                info.name,
                tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim),
            )
    return out


def graph_info(model: Any) -> OnnxGraph:
    """The model's main input and opset."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 11)
    if not inputs:
        return OnnxGraph(model, "", (), opset)
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    return OnnxGraph(model, inputs[0].name, shape, opset)


def _fixed(model: Any, example_shape: Sequence[int] | None) -> Any:
    """A copy with the main input's dims set to `example_shape`, shapes inferred."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    info = graph_info(copy)
    if example_shape is not None and info.input_name:
        target = next(i for i in copy.graph.input if i.name == info.input_name)
        dims = target.type.tensor_type.shape.dim
        if len(dims) and len(dims) != len(example_shape):
            raise ConvtoolError(
                f"the ONNX input {info.input_name!r} has {len(dims)} dims "
                f"({_dims(info.input_shape)}); the example input shape "
                f"{tuple(example_shape)} has {len(example_shape)}"
            )
        for d, size in zip(dims, example_shape, strict=True):
            if d.HasField("dim_value") and d.dim_value not in (0, size):
                raise ConvtoolError(
                    f"the ONNX input {info.input_name!r} has the fixed shape "
                    f"{_dims(info.input_shape)}; the example input shape {tuple(example_shape)} "
                    f"does not fit it"
                )
            d.dim_value = int(size)
        for value in copy.graph.value_info:  # stale symbolic shapes would fight the new ones
            value.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True)
    except Exception:
        return copy  # shapes stay unknown; layers still list with their weights


def _dims(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    values: dict[str, Any] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        values[attr.name] = value.decode() if isinstance(value, bytes) else value
    return values


def _same_pads(
    sizes: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    dil: Sequence[int],
    lower: bool,
) -> list[tuple[int, int]]:
    pairs = []
    for n, k, s, d in zip(sizes, kernel, stride, dil, strict=True):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        pairs.append((big, small) if lower else (small, big))
    return pairs


def node_spec(
    node: Any, weight: Tensor, has_bias: bool, sample: Sequence[int] | None
) -> tuple[ConvSpec, tuple[tuple[int, int], ...] | None, tuple[tuple[int, int], ...] | None]:
    """(spec, pre_pad, post_crop) of a Conv/ConvTranspose node for one input sample.

    Raises:
        ConvtoolError: attributes torch cannot express, or auto_pad SAME without a known input
            shape.
    """
    a = _attrs(node)
    ndim = weight.dim() - 2
    if ndim not in (1, 2, 3):
        raise ConvtoolError(f"node {node.name!r} is a {ndim}-d conv; convtool handles 1-d to 3-d")
    kernel = tuple(int(k) for k in a.get("kernel_shape", weight.shape[2:]))
    if kernel != tuple(weight.shape[2:]):
        raise ConvtoolError(
            f"node {node.name!r} has kernel_shape {kernel} but its weight is {tuple(weight.shape)}"
        )
    stride = tuple(int(s) for s in a.get("strides", [1] * ndim))
    dil = tuple(int(d) for d in a.get("dilations", [1] * ndim))
    group = int(a.get("group", 1))
    auto = str(a.get("auto_pad", "NOTSET")) or "NOTSET"
    pads = [int(p) for p in a.get("pads", [0] * (2 * ndim))]
    pairs = [(pads[i], pads[i + ndim]) for i in range(ndim)]
    spatial = tuple(sample[1:]) if sample is not None else None
    transposed = node.op_type == "ConvTranspose"
    if not transposed:
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            if spatial is None:
                raise ConvtoolError(
                    f"node {node.name!r} uses auto_pad={auto}, whose pads depend on the input "
                    f"size; give the example input shape"
                )
            pairs = _same_pads(spatial, kernel, stride, dil, auto == "SAME_LOWER")
        elif auto == "VALID":
            pairs = [(0, 0)] * ndim
        symmetric = all(lo == hi for lo, hi in pairs)
        spec = ConvSpec.from_weight(
            tuple(weight.shape),
            stride=stride,
            padding=tuple(lo for lo, _ in pairs) if symmetric else 0,
            dilation=dil,
            groups=group,
            bias=has_bias,
        )
        return spec, None if symmetric else tuple(pairs), None
    op = [int(p) for p in a.get("output_padding", [0] * ndim)]
    out_shape = [int(s) for s in a.get("output_shape", [])]
    if len(out_shape) == ndim + 2:
        out_shape = out_shape[2:]
    if out_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
        if spatial is None:
            raise ConvtoolError(
                f"node {node.name!r} sets its pads from output_shape/auto_pad, which depend on "
                f"the input size; give the example input shape"
            )
        if not out_shape:
            out_shape = [n * s for n, s in zip(spatial, stride, strict=True)]
        pairs = []
        for n, k, s, d, o, target in zip(spatial, kernel, stride, dil, op, out_shape, strict=True):
            total = s * (n - 1) + o + (k - 1) * d + 1 - target
            if total < 0:
                raise ConvtoolError(
                    f"node {node.name!r}: output_shape {tuple(out_shape)} is larger than the "
                    f"transposed conv can produce"
                )
            if auto == "SAME_UPPER":
                pairs.append((total // 2, total - total // 2))
            else:
                pairs.append((total - total // 2, total // 2))
    elif auto == "VALID":
        pairs = [(0, 0)] * ndim
    padding, out_pad, crops = [], [], []
    for (b, e), o in zip(pairs, op, strict=True):
        p = min(b, e)
        q = o if e <= b else max(0, o + b - e)
        padding.append(p)
        out_pad.append(q)
        crops.append((b - p, q - o - p + e))
    spec = ConvSpec.from_weight(
        tuple(weight.shape),
        stride=stride,
        padding=tuple(padding),
        dilation=dil,
        groups=group,
        transposed=True,
        output_padding=tuple(out_pad),
        bias=has_bias,
    )
    crop = tuple(crops) if any(lo or hi for lo, hi in crops) else None
    return spec, None, crop


def onnx_layers(
    model: Any, example_shape: Sequence[int] | None = None
) -> tuple[list[ConvLayer], list[str]]:
    """Every Conv/ConvTranspose node as a ConvLayer (see the module docstring), and notes.

    Args:
        model: an `onnx.ModelProto`.
        example_shape: the full input `(N, C, *spatial)`; fixes the main input's symbolic dims
            before shape inference.
    """
    inferred = _fixed(model, example_shape)
    constants = _constants(inferred)
    shapes = _shapes(inferred)
    layers: list[ConvLayer] = []
    notes: list[str] = []
    used: set[str] = set()
    for prefix, _, nodes in _graphs(inferred.graph):
        for i, node in enumerate(nodes):
            if node.op_type not in CONV_OPS or node.domain not in ("", "ai.onnx"):
                continue
            name = f"{prefix}{node.name or f'{node.op_type}_{i}'}"
            while name in used:
                name += "_"
            used.add(name)
            weight_proto = constants.get(node.input[1]) if len(node.input) > 1 else None
            if weight_proto is None:
                notes.append(
                    f"node {name!r} computes its weight in the graph (from {node.input[1]!r}); "
                    f"it has no fixed matrix and is left as it is"
                )
                continue
            weight = _tensor(weight_proto)
            bias = None
            if len(node.input) > 2 and node.input[2]:
                bias_proto = constants.get(node.input[2])
                if bias_proto is None:
                    notes.append(f"node {name!r} computes its bias in the graph; left as it is")
                    continue
                bias = _tensor(bias_proto).to(weight.dtype)
            full = shapes.get(node.input[0])
            sample: tuple[int, ...] | None = None
            if full is not None and len(full) == weight.dim() and all(full):
                sample = tuple(int(s) for s in full[1:])  # type: ignore[arg-type]
            skipped = None
            try:
                spec, pre_pad, post_crop = node_spec(node, weight, bias is not None, sample)
            except ConvtoolError as exc:
                try:
                    spec, pre_pad, post_crop = node_spec(
                        _no_auto(node), weight, bias is not None, None
                    )
                except ConvtoolError:
                    notes.append(str(exc))
                    continue
                skipped = str(exc)
            layer = ConvLayer(
                name,
                spec,
                weight,
                bias,
                call="onnx",
                pre_pad=pre_pad,
                post_crop=post_crop,
                origin=node,
                skipped=skipped,
            )
            if sample is not None and skipped is None:
                layer.add_shape(sample)
            layers.append(layer)
    unknown = [x.name for x in layers if x.input_shape is None and x.skipped is None]
    if unknown and example_shape is not None:
        more = f", ... ({len(unknown)} in all)" if len(unknown) > 3 else ""
        notes.append(
            f"ONNX shape inference gives no input shape for {', '.join(unknown[:3])}{more} "
            f"(shapes computed at run time); give such a layer its own one-sample input"
        )
    return layers, notes


def _no_auto(node: Any) -> Any:
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    keep = [a for a in copy.attribute if a.name not in ("auto_pad", "output_shape")]
    del copy.attribute[:]
    copy.attribute.extend(keep)
    return copy


# ---------------------------------------------------------------------------------- running
def reference_forward(layer: ConvLayer, x: Tensor) -> Tensor:
    """The node computed by torch's own conv from its attributes: pad, conv, crop.

    Args:
        layer: an ONNX layer (or any ConvLayer).
        x: `(N, C_in, *spatial)`.
    """
    if layer.pre_pad is not None:
        x = F.pad(x, [p for pair in reversed(layer.pre_pad) for p in pair])
    conv = build_conv(layer.spec, layer.weight.to(x.dtype), _cast(layer.bias, x.dtype))
    with torch.no_grad():
        y = conv(x)
    if layer.post_crop is not None:
        index = [slice(None), slice(None)]
        for (lo, hi), n in zip(layer.post_crop, y.shape[2:], strict=True):
            index.append(slice(lo, n - hi))
        y = y[tuple(index)]
    return y


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def run_node(layer: ConvLayer, x: Tensor, opset: int) -> Tensor | None:
    """The node alone, run by onnxruntime on `x` `(N, C_in, *spatial)` (float32 or float64);
    None when onnxruntime is not installed or cannot run it in this dtype."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.DOUBLE if x.dtype == torch.float64 else TensorProto.FLOAT
    np_dtype = "float64" if x.dtype == torch.float64 else "float32"
    node = onnx.NodeProto()
    node.CopyFrom(layer.origin)
    del node.input[:]
    del node.output[:]
    node.input.extend(["X", "W"] + (["B"] if layer.bias is not None else []))
    node.output.append("Y")
    node.name = "node"
    inits = [numpy_helper.from_array(layer.weight.numpy().astype(np_dtype), "W")]
    if layer.bias is not None:
        inits.append(numpy_helper.from_array(layer.bias.numpy().astype(np_dtype), "B"))
    graph = helper.make_graph(
        [node],
        "one_node",
        [helper.make_tensor_value_info("X", elem, list(x.shape))],
        [helper.make_tensor_value_info("Y", elem, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 11))])
    model.ir_version = min(model.ir_version, 10)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        (y,) = session.run(None, {"X": x.detach().numpy()})
    except Exception:
        return None
    return torch.from_numpy(y)


def output_numel(layer: ConvLayer, sample: Sequence[int]) -> int:
    """Entries of one output sample (crops applied)."""
    from convtool.inventory import layer_output_shape

    return math.prod(layer_output_shape(layer, sample))
