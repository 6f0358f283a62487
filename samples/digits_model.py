"""A small CNN for 16x16 digit images: the architecture behind the `digits_cnn.*` samples.

Use it with convtool as `--model samples.digits_model:make_model` (from the repository root).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

INPUT_SHAPE = (1, 1, 16, 16)  # one grey 16x16 image


class DigitsCNN(nn.Module):
    """`(N, 1, 16, 16)` images -> `(N, num_classes)` logits.

    Three convs (a strided one, a grouped one), BatchNorm, pooling and a linear head.
    """

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=4)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))  # (N, 8, 16, 16)
        x = torch.relu(self.conv2(x))  # (N, 16, 8, 8)
        x = self.pool(torch.relu(self.conv3(x)))  # (N, 16, 4, 4)
        return self.head(x.flatten(1))


def make_model(num_classes: int = 10, width: int = 8) -> nn.Module:
    """The untrained architecture (load `digits_cnn.pt` into it)."""
    return DigitsCNN(num_classes, width)
