"""Closed-form entry counts (convtool.sizes) against an independent oracle.

The oracle pads an index vector with torch's own F.pad (the padding map nn.Conv*d applies),
reads every (output position, tap) pair and counts what it reads; convtool's formulas never
build anything over output positions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from convtool.errors import ConvtoolError
from convtool.sizes import axis_distinct, axis_taps, structural_nnz, tap_count
from convtool.spec import ConvSpec


def oracle(n: int, m: int, k: int, s: int, d: int, lo: int, hi: int, mode: str) -> tuple[int, int]:
    """(taps reading real input, distinct (position, input index) pairs) by enumeration."""
    index = torch.arange(1, n + 1, dtype=torch.float64)[None, None]  # 0 marks zero padding
    padded = F.pad(index, (lo, hi)) if mode == "zeros" else F.pad(index, (lo, hi), mode=mode)
    row = padded[0, 0].tolist()
    taps = distinct = 0
    for o in range(m):
        read = [int(row[o * s + j * d]) for j in range(k)]
        real = [v for v in read if v > 0]
        taps += len(real) if mode == "zeros" else k
        distinct += len(set(real))
    return taps, distinct


@st.composite
def axis(draw: st.DrawFn) -> tuple[int, ...]:
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    n = draw(st.integers(1, 14))
    k, s, d = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    cap = {"reflect": n - 1, "circular": n}.get(mode, 12)
    lo, hi = draw(st.integers(0, cap)), draw(st.integers(0, cap))
    extent = d * (k - 1) + 1
    assume(extent <= n + lo + hi)  # torch refuses a kernel wider than the padded input
    m = (n + lo + hi - extent) // s + 1
    return n, m, k, s, d, lo, hi, mode  # type: ignore[return-value]


@given(axis())
@settings(max_examples=150, deadline=None)
def test_axis_counts_match_the_padding_oracle(args: tuple) -> None:  # type: ignore[type-arg]
    n, m, k, s, d, lo, hi, mode = args
    # the oracle's last tap must stay inside its padded row
    hi = max(hi, (m - 1) * s + (k - 1) * d - lo - (n - 1))
    expected = oracle(n, m, k, s, d, lo, hi, mode)
    assert (axis_taps(n, m, k, s, d, lo, mode), axis_distinct(n, m, k, s, d, lo, mode)) == expected


def test_whole_layer_counts_match_the_jacobian() -> None:
    """nnz of the autograd Jacobian (a non-zero random kernel makes every structural entry
    non-zero with probability 1) for each padding mode, groups and a transposed conv."""
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2),
        nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"),
        nn.Conv2d(2, 3, (3, 4), padding=(3, 1), padding_mode="replicate", stride=2),
        nn.Conv2d(2, 3, 3, padding=4, padding_mode="circular", dilation=2),
        nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1),
    ]
    for layer in layers:
        shape = (layer.in_channels, 5, 6)
        jac = torch.autograd.functional.jacobian(
            lambda x, layer=layer: layer(x[None]).flatten(), torch.randn(shape)
        )
        jac = jac.reshape(jac.shape[0], -1)
        spec = ConvSpec.from_module(layer)
        assert structural_nnz(spec, shape) == int((jac != 0).sum()), layer


def test_counts_at_absurd_sizes() -> None:
    """Closed forms: an implementation with arrays over output positions would need gigabytes
    here (2e8 positions per axis)."""
    spec = ConvSpec.create(2, 3, 4, 3, padding=99999999, padding_mode="replicate")
    p = 99999999
    m = 8 + 2 * p - 2
    # replicate, 8 inputs, 3 taps, start c = o - p: the p - 2 starts left of -2 and the p - 2
    # right of 7 read one clamped value each; c = -2, -1 read {0} and {0, 1}; c = 0..5 read 3
    # values; c = 6, 7 read {6, 7} and {7}: 2(p - 2) + 1 + 2 + 18 + 2 + 1
    assert axis_distinct(8, m, 3, 1, 1, p, "replicate") == 2 * (p - 2) + 24
    assert tap_count(spec, (3, 8, 8)) == 4 * 3 * (m * 3) ** 2
    zeros = ConvSpec.create(2, 3, 4, 3)
    assert structural_nnz(zeros, (3, 99999999, 99999999)) == 4 * 3 * (99999997 * 3) ** 2


def test_reflect_counts_at_absurd_sizes() -> None:
    """Reflect, 3 taps, dilation 1, padding n - 1: a position whose outermost tap is 1 past an
    edge reads that tap's mirror image inside (one value fewer); every other position reads 3
    distinct values. So 3m - 2 for m = 3n - 4 output positions."""
    n = 10**8
    m = n + 2 * (n - 1) - 2
    assert axis_distinct(n, m, 3, 1, 1, n - 1, "reflect") == 3 * m - 2
    # a dilated kernel wider than the input folds over both edges at every position: counted one
    # by one, so a count that would take hours is refused instead
    with pytest.raises(ConvtoolError, match="wider than the input"):
        axis_distinct(10**11, 10**11 - 2, 2, 1, 2 * 10**11, 10**11 - 1, "reflect")


@pytest.mark.parametrize(
    ("n", "k", "s", "d", "lo", "hi"),
    [
        (300, 3, 1, 1, 299, 299),
        (257, 5, 3, 2, 200, 256),
        (64, 4, 2, 30, 63, 63),
        (40, 7, 1, 4, 39, 20),
    ],
)
def test_reflect_counts_at_medium_sizes(n: int, k: int, s: int, d: int, lo: int, hi: int) -> None:
    m = (n + lo + hi - d * (k - 1) - 1) // s + 1
    expected = oracle(n, m, k, s, d, lo, hi, "reflect")[1]
    assert axis_distinct(n, m, k, s, d, lo, "reflect") == expected
