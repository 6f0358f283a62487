"""Fold an ONNX network into affine layers: every linear stretch between ReLUs becomes `W x + b`.

How `W` is found: the stretch (convs, BatchNorm, average pooling, pads, reshapes, Gemm/MatMul,
adds and scalings by constants, any mix of them) is run in float64 on batches of identity-basis
inputs; column `j` of `W` is `f(e_j) - f(0)` and `b = f(0)`. This is exact for any affine
stretch without a Toeplitz rule per op (and agrees with ONNX semantics because each op is
evaluated as ONNX defines it, see :mod:`convtool.export.linear_ops`). Unaffected outputs go through
the same arithmetic for `e_j` and for `0`, so their differences are exact zeros and the sparse
pattern of `W` is exact too. Work is chunked to a fixed batch budget.

The network must be a chain: graph input -> stretch -> Relu -> stretch -> ... -> output. Max
pooling, other activations and values used across a ReLU (skip connections) are refused, by
name, before anything is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from convtool.errors import ConvtoolError
from convtool.export import linear_ops as lops
from convtool.export.onnx_convs import PROTO_LIMIT, constants, shapes
from convtool.resources import check_memory, human_bytes

CHUNK_BYTES = 128 * 1024**2  # float64 activations alive while one identity batch runs


@dataclass
class AffineLayer:
    """`y = relu?(W x + b)`.

    Attributes:
        weight: `(out, in)`, a numpy array or a scipy CSR matrix.
        bias: `(out,)`.
        relu: whether a ReLU follows.
    """

    weight: Any
    bias: np.ndarray
    relu: bool

    @property
    def sparse(self) -> bool:
        return not isinstance(self.weight, np.ndarray)


@dataclass
class FoldedNetwork:
    """A network as affine layers and ReLUs, on flattened samples.

    Attributes:
        input_name / output_name: the original graph's tensor names.
        input_shape / output_shape: one sample, e.g. `(C, H, W)` and `(10,)`.
        layers: the affine layers, in order.
        dtype: the original model's float dtype.
    """

    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    layers: list[AffineLayer] = field(default_factory=list)
    dtype: Any = np.float32

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Evaluate on `(N, *input_shape)` -> `(N, *output_shape)` (numpy, the layers' dtype)."""
        h = np.asarray(x).reshape(len(x), -1)
        for layer in self.layers:
            h = (layer.weight @ h.T).T + layer.bias
            if layer.relu:
                h = np.maximum(h, 0)
        return np.asarray(h).reshape(len(x), *self.output_shape)


@dataclass
class Stretch:
    """Linear nodes between two ReLUs (or the graph's ends)."""

    src: str
    nodes: list[Any] = field(default_factory=list)
    dst: str = ""
    relu: bool = False
    values: list[str] = field(default_factory=list)  # every tensor alive in it, src included


def _label(node: Any) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def plan_fold(model: Any) -> tuple[list[Stretch], dict[str, np.ndarray], dict[str, Any]]:
    """Cut the graph into stretches at its ReLUs; refuse whatever does not fold. Builds nothing.

    Returns:
        (stretches, constants, inferred shapes).
    """
    graph = model.graph
    consts = constants(model)
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ConvtoolError(
            f"folding needs a model with one input and one output, this one has "
            f"{len(inputs)} and {len(graph.output)}"
        )
    known = shapes(model)
    current = Stretch(src=inputs[0].name, values=[inputs[0].name])
    stretches = [current]
    closed: set[str] = set()
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        data = lops.data_inputs(node, consts)
        crossing = [d for d in data if d in closed]
        if crossing:
            raise ConvtoolError(
                f"cannot fold: {_label(node)} reads {crossing[0]!r} from before a Relu (a skip "
                f"connection); only chains of linear stretches and ReLUs fold"
            )
        if node.op_type == "Relu":
            current.dst, current.relu = node.input[0], True
            closed.update(current.values)
            current = Stretch(src=node.output[0], values=[node.output[0]])
            stretches.append(current)
            continue
        if node.op_type not in lops.LINEAR_OPS:
            what = "max pooling is not linear" if "MaxPool" in node.op_type else "not linear"
            raise ConvtoolError(
                f"cannot fold the {_label(node)}: {what}; only linear ops "
                f"({', '.join(sorted(lops.LINEAR_OPS))}) and Relu fold into affine layers"
            )
        two = node.op_type in ("Add", "Sub") and len(data) == 2
        if len(data) != 1 and not two:
            raise ConvtoolError(
                f"cannot fold the {_label(node)}: it combines {len(data)} computed "
                f"tensors, which is not linear"
            )
        current.nodes.append(node)
        current.values.append(node.output[0])
    out = graph.output[0].name
    if out == current.src and len(stretches) > 1:  # the network ends with a ReLU
        stretches.pop()
    elif out not in current.values:
        raise ConvtoolError(f"cannot fold: the output {out!r} is not computed by the last stretch")
    else:
        current.dst = out
    for s in stretches:
        for name in (s.src, s.dst):
            if not lops.numel(known.get(name)):
                raise ConvtoolError(
                    f"cannot fold: the shape of {name!r} is not known; give the "
                    f"model fixed sizes except the batch"
                )
    batch = known[stretches[0].src][0]
    if batch is not None:
        consts["__batch__"] = np.array(batch)
    return stretches, consts, known


def _evaluate(stretch: Stretch, x: torch.Tensor, consts: dict[str, np.ndarray]) -> torch.Tensor:
    env = {stretch.src: x}
    for node in stretch.nodes:
        data = lops.data_inputs(node, consts)
        if len(data) == 2:
            a, b = env[data[0]], env[data[1]]
            y = a + b if node.op_type == "Add" else a - b
        else:
            y = lops.run(node, env[data[0]], consts)
        env[node.output[0]] = y
    return env[stretch.dst]


def fold_onnx(
    model: Any,
    *,
    sparse: bool = False,
    memory_limit: int | None = None,
    for_onnx: bool = True,
    advance: Callable[[int], None] | None = None,
) -> FoldedNetwork:
    """Fold an ONNX model into affine layers between ReLUs.

    Args:
        model: an `onnx.ModelProto` whose graph is a chain of linear ops and ReLUs (a plain CNN
            without max pooling: convs, BatchNorm, average pooling, pads, flatten, Linear).
        sparse: keep each layer's `W` sparse (scipy CSR); otherwise dense numpy.
        memory_limit: bytes the dense matrices may take (default: available memory).
        for_onnx: also refuse dense layers over the 2 GiB limit of one ONNX file.
        advance: called with the number of input columns done (a progress bar).

    Raises:
        ConvtoolError: for an op that does not fold (named), or dense layers that do not fit,
            before any layer is computed.
    """
    import scipy.sparse as sp

    stretches, consts, known = plan_fold(model)
    elem = model.graph.input[0].type.tensor_type.elem_type
    dtype = {1: np.float32, 11: np.float64, 10: np.float16}.get(elem, np.float32)
    itemsize = np.dtype(dtype).itemsize
    sizes = [(lops.numel(known[s.dst]), lops.numel(known[s.src])) for s in stretches]
    if not sparse:
        stored = sum(o * i for o, i in sizes) * itemsize
        biggest = max(o * i for o, i in sizes) * 8  # the float64 layer while it is built
        check_memory(
            stored + biggest,
            f"the {len(sizes)} dense folded layer(s) (largest "
            f"{max(sizes, key=lambda s: s[0] * s[1])})",
            "use sparse=True",
            memory_limit,
            params=("sparse",),
        )
        if for_onnx and stored > PROTO_LIMIT:
            raise ConvtoolError(
                f"the dense folded layers hold {human_bytes(stored)}, over the 2 GiB limit of "
                f"one ONNX file; use sparse=True",
                params=("sparse",),
            )
    first, last = known[stretches[0].src], known[stretches[-1].dst]
    net = FoldedNetwork(
        input_name=stretches[0].src,
        output_name=model.graph.output[0].name,
        input_shape=tuple(int(s) for s in first[1:]),
        output_shape=tuple(int(s) for s in last[1:]),
        dtype=dtype,
    )
    with torch.no_grad():
        for s, (n_out, n_in) in zip(stretches, sizes, strict=True):
            in_shape = tuple(int(d) for d in known[s.src][1:])
            alive = sum(lops.numel(known.get(v)) or n_in for v in s.values)
            chunk = max(1, min(n_in, CHUNK_BYTES // (8 * max(alive, 1))))
            bias = _evaluate(s, torch.zeros(1, *in_shape, dtype=torch.float64), consts)
            bias = bias.reshape(-1)
            dense = None if sparse else np.empty((n_out, n_in), np.float64)
            parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            for j0 in range(0, n_in, chunk):
                c = min(chunk, n_in - j0)
                eye = torch.zeros(c, n_in, dtype=torch.float64)
                eye[torch.arange(c), j0 + torch.arange(c)] = 1.0
                cols = _evaluate(s, eye.reshape(c, *in_shape), consts).reshape(c, n_out) - bias
                if dense is not None:
                    dense[:, j0 : j0 + c] = cols.t().numpy()
                else:
                    i, r = cols.nonzero(as_tuple=True)
                    parts.append((r.numpy(), (i + j0).numpy(), cols[i, r].numpy()))
                if advance is not None:
                    advance(c)
            if dense is not None:
                weight: Any = dense.astype(dtype)
            else:
                rows, cols_, vals = (np.concatenate(p) for p in zip(*parts, strict=True))
                weight = sp.csr_matrix((vals.astype(dtype), (rows, cols_)), shape=(n_out, n_in))
            net.layers.append(AffineLayer(weight, bias.numpy().astype(dtype), s.relu))
    return net


def folded_to_onnx(
    net: FoldedNetwork, *, opset: int = 18, batch: int | None = None, sparse_form: str = "auto"
) -> Any:
    """The folded network as ONNX: Flatten -> (MatMul -> Add -> Relu)* -> MatMul -> Add.

    Dense layers are MatMul (by `W^T`) and Add, the ops onnx2nnet and nnenum read; sparse
    layers use the Gather / Mul / per-row-sum form of :mod:`convtool.export.onnx_forms`. A
    Reshape restores a multi-dim output shape; a Flatten comes first only for a multi-dim input.

    Args:
        batch: a fixed batch size (e.g. 1 for tools that want one), or None for a dynamic one.
    """
    from onnx import TensorProto, helper

    from convtool.export import onnx_forms as forms

    dtype = np.dtype(net.dtype)
    b = forms.Builder(prefix="folded")
    x = net.input_name
    if len(net.input_shape) > 1:
        x = b.op("Flatten", [x], axis=1)
    for k, layer in enumerate(net.layers):
        if layer.sparse:
            x = forms.sparse_fc(
                b, x, layer.weight, layer.bias, (layer.weight.shape[0],), dtype, sparse_form
            )
        else:
            w = b.const(f"W{k}", np.ascontiguousarray(layer.weight.T.astype(dtype)))
            x = b.op("MatMul", [x, w])
            x = b.op("Add", [x, b.const(f"b{k}", layer.bias.astype(dtype))])
        if layer.relu:
            x = b.op("Relu", [x])
    if len(net.output_shape) > 1:
        x = b.reshape(x, net.output_shape)
    if not b.nodes:
        x = b.op("Identity", [x])
    b.nodes[-1].output[0] = net.output_name
    elem = {
        np.dtype(np.float32): TensorProto.FLOAT,
        np.dtype(np.float64): TensorProto.DOUBLE,
        np.dtype(np.float16): TensorProto.FLOAT16,
    }[dtype]
    n: int | str = batch if batch is not None else "N"
    graph = helper.make_graph(
        b.nodes,
        "convtool_folded",
        [helper.make_tensor_value_info(net.input_name, elem, [n, *net.input_shape])],
        [helper.make_tensor_value_info(net.output_name, elem, [n, *net.output_shape])],
        initializer=b.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="convtool"
    )
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of 2024+
    return model


def layer_sizes(net: FoldedNetwork) -> list[int]:
    """Input size, then each layer's output size."""
    return [math.prod(net.input_shape), *(layer.weight.shape[0] for layer in net.layers)]
