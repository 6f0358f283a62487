"""The linear (affine) ONNX ops a folded stretch may hold, evaluated with torch.

Folding evaluates a stretch on identity-basis batches, so each op here only needs to compute
what ONNX defines, on a batch `(B, ...)`, in float64. An op not in :data:`LINEAR_OPS` ends a
stretch (Relu) or is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from convtool.errors import ConvtoolError

Consts = dict[str, np.ndarray]


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _c(consts: Consts, name: str) -> Tensor:
    return torch.from_numpy(np.asarray(consts[name], dtype=np.float64))


def _torch_pads(pads: list[int]) -> list[int]:
    """ONNX `(b_1..b_d, e_1..e_d)` -> F.pad's `(b_d, e_d, ..., b_1, e_1)`."""
    d = len(pads) // 2
    return [p for i in reversed(range(d)) for p in (pads[i], pads[i + d])]


def _conv(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    w = _c(c, node.input[1])
    bias = _c(c, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    nd = w.dim() - 2
    stride = a.get("strides", [1] * nd)
    dil = a.get("dilations", [1] * nd)
    auto = a.get("auto_pad", "NOTSET")
    if node.op_type == "ConvTranspose":
        pads = a.get("pads", [0] * 2 * nd)
        if auto != "NOTSET" or "output_shape" in a or pads[:nd] != pads[nd:]:
            raise ConvtoolError(
                f"ConvTranspose node {node.name!r}: auto_pad, output_shape or "
                f"asymmetric pads cannot be folded"
            )
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        return fn(
            x, w, bias, stride, pads[:nd], a.get("output_padding", [0] * nd), a.get("group", 1), dil
        )
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        from convtool.export.onnx_convs import _same_pads

        pads = list(_same_pads(auto, x.shape[2:], w.shape[2:], stride, dil))
    else:
        pads = a.get("pads", [0] * 2 * nd) if auto == "NOTSET" else [0] * 2 * nd
    x = F.pad(x, _torch_pads(pads))
    conv: Any = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, bias, stride, 0, dil, a.get("group", 1))


def _channel(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(1, -1, *(1,) * (x.dim() - 2))


def _batchnorm(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    scale, shift, mean, var = (_c(c, n) for n in node.input[1:5])
    inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))
    return (x - _channel(mean, x)) * _channel(inv, x) + _channel(shift, x)


def _avgpool(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    kernel = a["kernel_shape"]
    nd = len(kernel)
    pads = a.get("pads", [0] * 2 * nd)
    if (
        a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        or pads[:nd] != pads[nd:]
        or any(d != 1 for d in a.get("dilations", [1] * nd))
    ):
        raise ConvtoolError(
            f"AveragePool node {node.name!r}: auto_pad, asymmetric pads or "
            f"dilations cannot be folded"
        )
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return fn(
        x,
        kernel,
        a.get("strides", [1] * nd),
        pads[:nd],
        bool(a.get("ceil_mode", 0)),
        bool(a.get("count_include_pad", 0)),
    )


def _pad(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    pads = [int(p) for p in c[node.input[1]]]
    value = float(c[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0.0
    if len(node.input) > 3 and node.input[3]:
        axes = [int(v) % x.dim() for v in c[node.input[3]]]
        full = [0] * 2 * x.dim()
        for i, ax in enumerate(axes):
            full[ax], full[ax + x.dim()] = pads[i], pads[i + len(axes)]
        pads = full
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[
        a.get("mode", "constant")
    ]
    d = x.dim()
    if pads[0] or pads[d] or (mode != "constant" and (pads[1] or pads[d + 1])):
        raise ConvtoolError(
            f"Pad node {node.name!r} pads the batch (or channels in "
            f"{mode} mode); it cannot be folded"
        )
    spatial = pads[2:d] + pads[d + 2 :] if mode != "constant" else pads[1:d] + pads[d + 1 :]
    if mode == "constant":
        return F.pad(x, _torch_pads(spatial), value=value)
    return F.pad(x, _torch_pads(spatial), mode=mode)


def _reshape(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    shape = [int(s) for s in c[node.input[1]]]
    head = shape[0]
    rest = [
        x.shape[i + 1] if s == 0 and not a.get("allowzero", 0) else s
        for i, s in enumerate(shape[1:])
    ]
    static = int(c["__batch__"]) if "__batch__" in c else None
    if (head not in (-1, 0) and head != static) or (head == -1 and -1 in rest):
        raise ConvtoolError(
            f"Reshape node {node.name!r} to {shape} mixes the batch with the "
            f"features; it cannot be folded"
        )
    return x.reshape(x.shape[0], *rest)


def _gemm(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    if a.get("transA", 0) or node.input[1] not in c:
        raise ConvtoolError(f"Gemm node {node.name!r} multiplies two computed tensors")
    w = _c(c, node.input[1])
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    if len(node.input) > 2 and node.input[2]:
        y = y + a.get("beta", 1.0) * _c(c, node.input[2])
    return y


def _binary(
    op: Callable[[Tensor, Tensor], Tensor], data_first: bool = False
) -> Callable[..., Tensor]:
    def run(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
        first = node.input[0] not in c
        other = _c(c, node.input[1] if first else node.input[0])
        if data_first and not first:
            raise ConvtoolError(f"{node.op_type} node {node.name!r} divides by a computed tensor")
        return op(x, other) if first else op(other, x)

    return run


def _transpose(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    perm = a.get("perm", list(reversed(range(x.dim()))))
    if perm[0] != 0:
        raise ConvtoolError(f"Transpose node {node.name!r} moves the batch; it cannot be folded")
    return x.permute(*perm)


def _axes(node: Any, c: Consts, a: dict[str, Any]) -> list[int]:
    if "axes" in a:
        return list(a["axes"])
    return [int(v) for v in c[node.input[1]]] if len(node.input) > 1 and node.input[1] else []


def _squeeze(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    axes = [ax % x.dim() for ax in _axes(node, c, a)] or [
        i for i in range(1, x.dim()) if x.shape[i] == 1
    ]
    if 0 in axes:
        raise ConvtoolError(f"Squeeze node {node.name!r} removes the batch")
    for ax in sorted(axes, reverse=True):
        x = x.squeeze(ax)
    return x


def _unsqueeze(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    axes = sorted(ax % (x.dim() + len(_axes(node, c, a))) for ax in _axes(node, c, a))
    if 0 in axes:
        raise ConvtoolError(f"Unsqueeze node {node.name!r} adds a dim before the batch")
    for ax in axes:
        x = x.unsqueeze(ax)
    return x


def _flatten(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    if a.get("axis", 1) != 1:
        raise ConvtoolError(f"Flatten node {node.name!r} with axis={a.get('axis')} mixes the batch")
    return x.reshape(x.shape[0], -1)


def _global_avg(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _matmul(x: Tensor, node: Any, c: Consts, a: dict[str, Any]) -> Tensor:
    if node.input[1] not in c:
        raise ConvtoolError(f"MatMul node {node.name!r} multiplies by a computed tensor")
    return x @ _c(c, node.input[1])


LINEAR_OPS: dict[str, Callable[[Tensor, Any, Consts, dict[str, Any]], Tensor]] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "BatchNormalization": _batchnorm,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avg,
    "Pad": _pad,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div, data_first=True),
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Identity": lambda x, n, c, a: x,
    "Dropout": lambda x, n, c, a: x,  # inference: the identity
}
# Inputs of these ops that are parameters (constants), not the data.
NONLINEAR = {"Relu"}


def data_inputs(node: Any, consts: Consts) -> list[str]:
    """The inputs of `node` that are computed tensors (not constants or absent)."""
    return [i for i in node.input if i and i not in consts]


def run(node: Any, x: Tensor, consts: Consts) -> Tensor:
    """Evaluate one linear node on a float64 batch `x`."""
    return LINEAR_OPS[node.op_type](x, node, consts, _attrs(node))


def numel(shape: tuple[int | None, ...] | None) -> int:
    """Features of one sample of a `(N, ...)` shape; 0 when unknown."""
    if shape is None or any(s is None for s in shape[1:]):
        return 0
    return math.prod(int(s or 0) for s in shape[1:])
