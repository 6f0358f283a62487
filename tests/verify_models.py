"""A small model for the verify tests, importable as `tests.verify_models:make_model`.

It has strides, dilation, groups, reflect and circular padding, and a Conv1d after a reshape;
with `transposed=True` it ends in a ConvTranspose1d (no LC form).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

EXAMPLE_SHAPE = (2, 3, 12, 12)


class VerifyNet(nn.Module):
    """`(N, 3, 12, 12)` -> `(N, 4, 18)`, or `(N, 2, 37)` with `transposed=True`."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(8, 8, 3, dilation=2, padding=2, groups=4, bias=False)
        self.conv3 = nn.Conv1d(8, 4, 5, stride=2, padding=2, padding_mode="circular")
        self.up = nn.ConvTranspose1d(4, 2, 3, stride=2, groups=2) if transposed else None

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = self.conv2(x) + x
        x = self.conv3(x.flatten(2))  # (N, 8, 6, 6) -> (N, 8, 36)
        return self.up(torch.tanh(x)) if self.up is not None else x


def make_model(transposed: bool = False, seed: int = 0) -> nn.Module:
    """A seeded :class:`VerifyNet`."""
    torch.manual_seed(seed)
    return VerifyNet(transposed=transposed)
