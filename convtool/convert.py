"""One conv layer -> its exact locally-connected or fully-connected module."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from convtool import sizes
from convtool.dtypes import compute_tensor
from convtool.errors import ConvtoolError
from convtool.layers import (
    FullyConnected,
    LocallyConnected1d,
    LocallyConnected2d,
    LocallyConnected3d,
    _LocallyConnectedNd,
)
from convtool.matrices import SparseLayout, bias_vector_for, matrix
from convtool.spec import ConvSpec

__all__ = ["to_fully_connected", "to_locally_connected"]


def _weight(conv: nn.Module) -> Tensor:
    """The conv's weight in its compute dtype (integers -> float64, as the CLI reads them)."""
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, Tensor):
        raise ConvtoolError(f"{type(conv).__name__} has no weight tensor")
    return compute_tensor(weight)


def to_locally_connected(conv: nn.Module, input_shape: Sequence[int]) -> _LocallyConnectedNd:
    """The locally-connected layer that computes exactly what `conv` computes on `input_shape`.

    Every output position gets a copy of the conv kernel and of the bias, so the result starts
    out equal to `conv` and can then be trained without weight sharing.

    Args:
        conv: `nn.Conv1d/2d/3d` with any stride, padding (ints, 'same', 'valid'), padding mode,
            dilation and groups.
        input_shape: one sample `(C_in, *spatial)`; a leading batch dim is accepted.

    Returns:
        A :class:`~convtool.layers.LocallyConnected1d` / ``2d`` / ``3d`` on the conv's device
        and dtype, with input `(N, C_in, *spatial)` and the conv's output shape.

    Raises:
        ConvtoolError: for a transposed conv (the LC form is defined for Conv1d/2d/3d; use the
            FC form for those), a non-conv module, or an input shape the conv rejects.
    """
    spec = ConvSpec.from_module(conv)
    if spec.transposed:
        raise ConvtoolError(
            f"the locally-connected form is defined for Conv1d/2d/3d, not {spec.kind}; use the "
            f"fully-connected form (to_fully_connected) for transposed layers"
        )
    sample = spec.sample_shape(input_shape)
    weight = _weight(conv)
    out = spec.output_shape(sample)
    sizes.check_elements(
        (math.prod(out) * spec.kernel_numel * (spec.in_channels // spec.groups))
        + (math.prod(out) if spec.bias else 0),
        weight.dtype,
        f"the locally-connected form of {spec.describe()} on input {sample} (one kernel per "
        f"output position)",
        "use a smaller input shape, or the sparse fully-connected form (to_fully_connected("
        "..., sparse=True))",
    )
    lc_type = (LocallyConnected1d, LocallyConnected2d, LocallyConnected3d)[spec.ndim - 1]
    lc = lc_type(
        spec.in_channels,
        spec.out_channels,
        sample[1:],
        spec.kernel_size,
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
        groups=spec.groups,
        bias=spec.bias,
        padding_mode=spec.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        lc.weight.copy_(weight.expand_as(lc.weight))
        bias = getattr(conv, "bias", None)
        if lc.bias is not None and isinstance(bias, Tensor):
            bias = compute_tensor(bias, "the bias")
            lc.bias.copy_(bias.view(-1, *(1,) * spec.ndim).expand_as(lc.bias))
    return lc


def to_fully_connected(
    conv: nn.Module,
    input_shape: Sequence[int],
    *,
    sparse: bool = False,
    layout: SparseLayout = "csr",
) -> FullyConnected:
    """The fully-connected layer `y = T x + b` equal to `conv` on `input_shape`.

    Args:
        conv: any `nn.Conv1d/2d/3d` or `nn.ConvTranspose1d/2d/3d`.
        input_shape: one sample `(C_in, *spatial)`; a leading batch dim is accepted.
        sparse: store `T` as a torch sparse buffer (built from its indices, never densely)
            instead of a dense trainable parameter.
        layout: 'csr' (fast on CPU) or 'coo', when `sparse`.

    Returns:
        A :class:`~convtool.layers.FullyConnected` taking `(N, C_in, *spatial)` and returning
        the conv's output shape, on the conv's device and dtype.

    Raises:
        ConvtoolError: for a non-conv module, an input shape the conv rejects, or a dense `T`
            that does not fit in available memory (use `sparse=True`).
    """
    spec = ConvSpec.from_module(conv)
    sample = spec.sample_shape(input_shape)
    weight = _weight(conv)
    t = matrix(spec, weight, sample, sparse=sparse, layout=layout)  # checks memory first
    bias = getattr(conv, "bias", None)
    b = bias_vector_for(spec, bias, sample, weight.dtype) if isinstance(bias, Tensor) else None
    out_shape = spec.output_shape(sample)
    return FullyConnected(
        sample, out_shape, t.to(weight.device), None if b is None else b.to(weight.device)
    )
