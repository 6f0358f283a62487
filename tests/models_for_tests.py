"""Small architectures for the loader/convert tests.

Importable as `--model tests.models_for_tests:make_mixed` from the repository root.

Every factory is deterministic (its own seed) and puts BatchNorm running statistics away from
their defaults, so eval-mode BatchNorm is not the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIXED_INPUT = (2, 3, 11, 9)
TRANSPOSED_INPUT = (1, 2, 6, 5)
VOLUME_INPUT = (1, 2, 5, 6, 4)


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.2, 0.2)
        for p in model.parameters(recurse=False):
            nn.init.normal_(p, std=0.3)
    return model.eval()


class Mixed(nn.Module):
    """Pads outside the convs, pooling, BatchNorm, a Conv1d after a reshape, non-square kernels
    and strides, groups, dilation, reflect and circular padding. Input `(N, 3, 11, 9)`."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(
            3, width, (3, 2), stride=(2, 1), padding=(1, 2), padding_mode="reflect"
        )
        self.bn = nn.BatchNorm2d(width)
        self.features = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=2, dilation=2, groups=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 4, (1, 3), stride=(1, 2), bias=False),
        )
        self.seq = nn.Conv1d(4, 5, 3, padding=1, padding_mode="circular")
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (1, 2, 0, 1))  # a pad no conv knows about
        x = torch.relu(self.bn(self.stem(x)))
        x = self.features(x)
        x = x.flatten(2)  # (N, 4, H*W): a Conv1d after a reshape
        x = self.seq(x)
        return self.head(x.mean(-1))


class Functional(nn.Module):
    """A conv module plus a conv computed with F.conv2d on a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.kernel = nn.Parameter(torch.zeros(2, 4, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(torch.relu(self.conv(x)), self.kernel, stride=2)


class Transposed(nn.Module):
    """A conv and a transposed conv (which has no LC form). Input `(N, 2, 6, 5)`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(torch.tanh(self.down(x)))


class Volume(nn.Module):
    """Conv3d with replicate padding and 'same' padding. Input `(N, 2, 5, 6, 4)`."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, 3, (2, 3, 1), padding=1, padding_mode="replicate")
        self.b = nn.Conv3d(3, 2, 3, padding="same")

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.gelu(self.a(x)))


class Shared(nn.Module):
    """One conv module called on two different input sizes: it has no single matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.other = nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        z = self.conv(F.avg_pool2d(y, 2))
        return self.other(y).sum((2, 3)) + z.sum((2, 3))


class StandardizedConv(nn.Conv2d):
    """A conv subclass whose forward uses a transformed weight (weight standardization)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.std = StandardizedConv(2, 3, 3)
        self.plain = nn.Conv2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.plain(self.std(x))


def make_mixed(width: int = 6) -> nn.Module:
    return _seeded(Mixed(width), 0)


def make_functional() -> nn.Module:
    return _seeded(Functional(), 1)


def make_transposed() -> nn.Module:
    return _seeded(Transposed(), 2)


def make_volume() -> nn.Module:
    return _seeded(Volume(), 3)


def make_shared() -> nn.Module:
    return _seeded(Shared(), 4)


def make_custom() -> nn.Module:
    return _seeded(Custom(), 5)


def not_a_model() -> str:
    return "not a module"
