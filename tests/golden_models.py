"""Models for the golden table tests: long dotted names, small-integer weights.

Integer weights (-1, 0, 1) and bias keep every product exact in float64, so `verify` on all-ones
and zero inputs reports errors of exactly 0 on any machine: the golden output is deterministic.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

INPUT = (1, 2, 8, 8)


def _integer(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.arange(p.numel()) % 3 - 1).reshape(p.shape).to(p.dtype))
    return module


class LongNames(nn.Module):
    """Four convs whose names are far longer than a narrow column."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.stage_one = nn.Sequential(
            OrderedDict(
                depthwise_separable_block=nn.Conv2d(2, 4, 3, padding=1, groups=2),
                pointwise_projection=nn.Conv2d(4, 6, 1, bias=False),
            )
        )
        self.decoder = nn.Module()
        self.decoder.upsample_transposed = nn.ConvTranspose2d(6, 3, 2, stride=2)
        self.head = nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder.stage_one(x)
        return self.head(self.decoder.upsample_transposed(x))


def make_long_names() -> nn.Module:
    return _integer(LongNames().double())
