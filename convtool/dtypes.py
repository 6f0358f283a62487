"""Which weight dtypes the forms are computed in: one rule for every entry point.

Float16, bfloat16, float32 and float64 are used as they are. Integer and bool weights are
computed in float64, exactly (as the CLI reads an integer kernel file). Float8 and other
exotic floats have no CPU arithmetic in PyTorch, complex weights no real matrix: both refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convtool.errors import ConvtoolError

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype(dtype: torch.dtype, what: str = "the weight") -> torch.dtype:
    """The dtype a form of a layer with weights of `dtype` is built in, or ConvtoolError."""
    if dtype in COMPUTE_DTYPES:
        return dtype
    if dtype.is_complex:
        raise ConvtoolError(f"{what} is complex ({_name(dtype)}); convtool handles real tensors")
    if dtype.is_floating_point:
        raise ConvtoolError(
            f"{what} is {_name(dtype)}, which PyTorch cannot compute with on the CPU; cast it "
            f"to float32 first (exact for every {_name(dtype)} value)"
        )
    return torch.float64  # integers and bools: exact in float64 up to 2**53


def compute_tensor(t: object, what: str = "the weight") -> Tensor:
    """`t` detached and in its compute dtype; refuses non-tensors and meta tensors."""
    if not isinstance(t, Tensor):
        raise ConvtoolError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ConvtoolError(
            f"{what} is on the meta device and holds no values; materialise it first (e.g. "
            f"module.to_empty(device='cpu') then load_state_dict)"
        )
    dtype = compute_dtype(t.dtype, what)
    return t.detach() if t.dtype == dtype else t.detach().to(dtype)
