"""Cheap checks on a PyTorch model before anything is exported or built.

One forward pass on a zero sample under a `TorchDispatchMode` lists every ATen op the model runs
(eager, TorchScript and torch.export GraphModules alike) and the size of every ReLU input. That
is enough to refuse a fold (a non-linear op, or dense layers that would not fit) by name before
the model is exported and before any matrix exists.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from convtool.errors import ConvtoolError
from convtool.resources import check_memory, human_bytes

# ATen ops that are neither affine nor ReLU (what a fold would meet in common CNNs).
_NONLINEAR = {
    "max_pool1d": "max pooling",
    "max_pool2d": "max pooling",
    "max_pool3d": "max pooling",
    "max_pool1d_with_indices": "max pooling",
    "max_pool2d_with_indices": "max pooling",
    "max_pool3d_with_indices": "max pooling",
    "adaptive_max_pool1d": "max pooling",
    "adaptive_max_pool2d": "max pooling",
    "adaptive_max_pool3d": "max pooling",
    "sigmoid": "an activation",
    "tanh": "an activation",
    "gelu": "an activation",
    "silu": "an activation",
    "mish": "an activation",
    "elu": "an activation",
    "leaky_relu": "an activation",
    "hardtanh": "an activation",
    "hardswish": "an activation",
    "hardsigmoid": "an activation",
    "softplus": "an activation",
    "prelu": "an activation",
    "_prelu_kernel": "an activation",
    "_softmax": "softmax",
    "_log_softmax": "softmax",
    "clamp": "a clamp",
    "clamp_min": "a clamp",
    "clamp_max": "a clamp",
    "abs": "data-dependent",
    "maximum": "data-dependent",
    "minimum": "data-dependent",
    "max": "data-dependent",
    "min": "data-dependent",
    "amax": "data-dependent",
    "amin": "data-dependent",
    "where": "data-dependent",
    "sort": "data-dependent",
    "topk": "data-dependent",
    "native_layer_norm": "normalisation by the data",
    "native_group_norm": "normalisation by the data",
    "_native_batch_norm_legit": "BatchNorm in training mode",
}
_RELU = {"relu", "relu_"}


@dataclass
class Scan:
    """What one forward pass ran.

    Attributes:
        ops: ATen op names in call order, without namespace and overload ('convolution').
        relu_features: per-sample element count of each ReLU input, in order.
        in_features / out_features: per-sample sizes of the model's input and output.
    """

    ops: list[str] = field(default_factory=list)
    relu_features: list[int] = field(default_factory=list)
    in_features: int = 0
    out_features: int = 0


class _Ops(TorchDispatchMode):
    def __init__(self, scan: Scan) -> None:
        super().__init__()
        self.scan = scan

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name.split("::")[-1]
        self.scan.ops.append(name)
        if name in _RELU and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            self.scan.relu_features.append(t.numel() // max(int(t.shape[0]), 1) if t.dim() else 1)
        return func(*args, **(kwargs or {}))


def scan_model(model: nn.Module | Any, example_shape: Sequence[int]) -> Scan:
    """Run `model` once (eval, no grad) on zeros of one sample and list what it computes."""
    shape = (1, *(int(s) for s in example_shape[1:]))
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.zeros(shape, dtype=param.dtype if param is not None else torch.float32)
    scan = Scan(in_features=math.prod(shape[1:]))
    was = getattr(model, "training", False)
    with contextlib.suppress(NotImplementedError):
        model.eval()
    try:
        with torch.no_grad(), _Ops(scan):
            y = model(x)
    except ConvtoolError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConvtoolError(
            f"running the model on an input of shape {shape} failed: "
            f"{type(exc).__name__}: {text[:200]}"
        ) from None
    finally:
        with contextlib.suppress(NotImplementedError):
            model.train(was)
    if not isinstance(y, torch.Tensor):
        raise ConvtoolError("the model must return one tensor to be written as ONNX")
    scan.out_features = y.numel()
    return scan


def check_foldable(scan: Scan) -> None:
    """Refuse a model that runs an op which is neither affine nor a ReLU."""
    for op in scan.ops:
        if op in _NONLINEAR:
            raise ConvtoolError(
                f"cannot fold: the model runs {op} ({_NONLINEAR[op]}), which is not linear; only "
                f"convs, BatchNorm (eval), average pooling, pads, reshapes, Linear and ReLU fold"
            )


def check_fold_size(scan: Scan, itemsize: int, memory_limit: int | None, for_onnx: bool) -> None:
    """Refuse dense folded layers that would not fit (in memory, or in one ONNX file)."""
    sizes = [scan.in_features, *scan.relu_features, scan.out_features]
    products = [a * b for a, b in itertools.pairwise(sizes)]
    stored = sum(products) * itemsize
    check_memory(
        stored + max(products) * 8,
        f"the {len(products)} dense folded layer(s) (sizes {' -> '.join(map(str, sizes))})",
        "use sparse=True",
        memory_limit,
        params=("sparse",),
    )
    if for_onnx and stored > 2**31 - 1:
        raise ConvtoolError(
            f"the dense folded layers hold {human_bytes(stored)}, over the 2 GiB "
            f"limit of one ONNX file; use sparse=True",
            params=("sparse",),
        )
