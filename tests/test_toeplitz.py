"""T against independent oracles: the autograd Jacobian of the layer and the layer itself."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convtool import ConvSpec, ConvtoolError, bias_vector, toeplitz, toeplitz_from_weight
from convtool.matrices import dense_row_blocks, structural_nnz


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def jacobian(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """d layer(x).flatten() / d x.flatten() for one sample: the oracle for T."""
    x = torch.randn(shape)
    return torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, *shape)).flatten(), x.flatten()
    )


def assert_exact(layer: nn.Module, shape: tuple[int, ...]) -> None:
    layer = layer.double()
    expected = jacobian(layer, shape)
    t = toeplitz(layer, shape)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-12)
    for layout in ("coo", "csr"):
        ts = toeplitz(layer, shape, sparse=True, layout=layout)
        assert ts.layout == (torch.sparse_coo if layout == "coo" else torch.sparse_csr)
        torch.testing.assert_close(ts.to_dense(), expected, rtol=0, atol=1e-12)
        assert ts.values().numel() == structural_nnz(ConvSpec.from_module(layer), shape)
    x = torch.randn(shape)
    y = layer(x[None]).detach().flatten()
    torch.testing.assert_close(
        t @ x.flatten() + bias_vector(layer, shape), y, rtol=1e-12, atol=1e-12
    )


MODES = ("zeros", "reflect", "replicate", "circular")


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "cfg",
    [
        dict(kernel_size=3, stride=1, padding=0, dilation=1, groups=1, bias=True),
        dict(kernel_size=2, stride=2, padding=1, dilation=1, groups=2, bias=False),
        dict(kernel_size=3, stride=(1, 2, 3), padding=(2, 1, 0), dilation=(2, 1, 1), groups=1),
        dict(kernel_size=(2, 3, 1), stride=1, padding="same", dilation=(1, 2, 1), groups=2),
        dict(kernel_size=3, stride=3, padding="valid", dilation=1, groups=4, bias=True),
    ],
)
def test_conv_matches_jacobian(ndim: int, mode: str, cfg: dict) -> None:
    cfg = {k: (v[:ndim] if isinstance(v, tuple) else v) for k, v in cfg.items()}
    spatial = (5, 6, 4)[:ndim]
    layer = CONV[ndim](4, 8, padding_mode=mode, **cfg)
    assert_exact(layer, (4, *spatial))


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(kernel_size=3, stride=1, padding=0),
        dict(kernel_size=3, stride=2, padding=1, output_padding=1, groups=2),
        dict(kernel_size=(2, 3, 2), stride=(2, 1, 3), padding=(0, 1, 1), output_padding=(1, 0, 2)),
        # output_padding >= stride is allowed when dilation is larger
        dict(kernel_size=2, stride=1, dilation=3, output_padding=2, groups=4, bias=False),
    ],
)
def test_transposed_matches_jacobian(ndim: int, cfg: dict) -> None:
    cfg = {k: (v[:ndim] if isinstance(v, tuple) else v) for k, v in cfg.items()}
    layer = CONV_T[ndim](4, 8, **cfg)
    assert_exact(layer, (4, *(3, 4, 2)[:ndim]))


def test_replicate_taps_on_one_column_are_summed() -> None:
    # kernel wider than the input: with replicate padding many taps read the same pixel
    layer = nn.Conv1d(2, 3, 5, padding=4, padding_mode="replicate").double()
    assert_exact(layer, (2, 2))
    t = toeplitz(layer, (2, 2))
    w = layer.weight.detach()
    # output position 0 reads padded [-4..0]: the first 5 taps all land on input 0
    assert torch.allclose(t[0, 0], w[0, 0].sum())


def test_seed_example_matches_classic_construction() -> None:
    """Kernel (4,3,3,3), input (3,7,9): the (140,189) multi-channel matrix built by loops."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3))
    classic = np.zeros((4 * 5 * 7, 3 * 7 * 9))
    for co, i, j, ci, ki, kj in itertools.product(
        range(4), range(5), range(7), range(3), range(3), range(3)
    ):
        classic[co * 35 + i * 7 + j, ci * 63 + (i + ki) * 9 + (j + kj)] = w[co, ci, ki, kj]
    t = toeplitz_from_weight(torch.from_numpy(w), (3, 7, 9))
    assert t.shape == (140, 189)
    np.testing.assert_array_equal(t.numpy(), classic)


def test_from_weight_equals_module_and_accepts_batch() -> None:
    layer = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    layer = layer.double()
    t = toeplitz_from_weight(
        layer.weight, (1, 4, 7, 6), stride=(2, 1), padding=1, dilation=(1, 2), groups=2
    )
    torch.testing.assert_close(t, jacobian(layer, (4, 7, 6)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 7, 40, 10_000])
@pytest.mark.parametrize("transposed", [False, True])
def test_row_blocks_reassemble_the_matrix(rows: int, transposed: bool) -> None:
    layer: nn.Module
    if transposed:
        layer = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        shape = (4, 3, 4)
    else:
        layer = nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect", groups=2)
        shape = (4, 3, 5)
    layer = layer.double()
    spec = ConvSpec.from_module(layer)
    blocks = list(dense_row_blocks(spec, layer.weight, shape, rows))
    assert [r0 for r0, _ in blocks] == list(range(0, blocks[-1][0] + 1, rows))
    full = torch.cat([b for _, b in blocks])
    torch.testing.assert_close(full, jacobian(layer, shape), rtol=0, atol=1e-12)


def test_sparse_never_builds_dense() -> None:
    # dense T would be 8.6e12 entries (34 TB in float32); the sparse one has ~1e7
    layer = nn.Conv2d(16, 16, 3, padding=1, bias=False).float()
    shape = (16, 96, 96)
    t = toeplitz(layer, shape, sparse=True, layout="csr")
    assert t.shape == (16 * 96 * 96, 16 * 96 * 96)
    assert t.values().numel() == structural_nnz(ConvSpec.from_module(layer), shape)
    x = torch.randn(1, *shape, dtype=torch.float32)
    y = (t @ x.flatten()[:, None]).flatten()
    torch.testing.assert_close(y, layer(x).detach().flatten(), rtol=1e-4, atol=1e-4)


@given(
    ndim=st.integers(1, 3),
    transposed=st.booleans(),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_property_matches_jacobian(ndim: int, transposed: bool, data: st.DataObject) -> None:
    groups = data.draw(st.sampled_from([1, 2]))
    cin = groups * data.draw(st.integers(1, 2))
    cout = groups * data.draw(st.integers(1, 2))
    kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(data.draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(data.draw(st.integers(1, 2)) for _ in range(ndim))
    bias = data.draw(st.booleans())
    if transposed:
        padding: object = tuple(data.draw(st.integers(0, 2)) for _ in range(ndim))
        out_pad = tuple(
            data.draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
        )
        layer: nn.Module = CONV_T[ndim](
            cin, cout, kernel, stride, padding, out_pad, groups, bias, dilation
        )
        spatial = tuple(data.draw(st.integers(1, 4)) for _ in range(ndim))
    else:
        mode = data.draw(st.sampled_from(MODES))
        if data.draw(st.booleans()):
            padding = data.draw(st.sampled_from(["same", "valid"]))
            if padding == "same":
                stride = (1,) * ndim
        else:
            padding = tuple(data.draw(st.integers(0, 3)) for _ in range(ndim))
        layer = CONV[ndim](cin, cout, kernel, stride, padding, dilation, groups, bias, mode)
        spatial = tuple(data.draw(st.integers(1, 6)) for _ in range(ndim))
    shape = (cin, *spatial)
    layer = layer.double()
    try:
        layer(torch.zeros(1, *shape))
    except RuntimeError:
        # torch refuses this combination: so must we, with our own error type
        with pytest.raises(ConvtoolError):
            toeplitz(layer, shape)
        return
    assert_exact(layer, shape)


@pytest.mark.parametrize(
    "make, shape, match",
    [
        (lambda: nn.Conv2d(3, 4, 3), (4, 7, 9), "expects 3 input channels"),
        (lambda: nn.Conv2d(3, 4, 5), (3, 3, 9), "kernel size can't be greater"),
        (lambda: nn.Conv2d(3, 4, 3, dilation=3), (3, 6, 9), "kernel size can't be greater"),
        (lambda: nn.Conv2d(3, 4, 3, padding=3, padding_mode="reflect"), (3, 3, 9), "reflect"),
        (lambda: nn.Conv1d(3, 4, 3, padding=4, padding_mode="circular"), (3, 3), "circular"),
        (lambda: nn.Conv2d(3, 4, 3), (3, 7), "3 numbers"),
        (lambda: nn.Conv2d(3, 4, 3), (3, 0, 9), "positive"),
        (lambda: nn.ConvTranspose1d(2, 2, 1, padding=2), (2, 1), "non-positive output"),
    ],
)
def test_unfit_inputs_raise_like_torch(make, shape, match) -> None:  # type: ignore[no-untyped-def]
    layer = make()
    with pytest.raises(ConvtoolError, match=match):
        toeplitz(layer, shape)
    with pytest.raises(RuntimeError):  # the oracle agrees the input is unfit
        layer(torch.zeros(1, *shape, dtype=layer.weight.dtype))


def test_bad_hyperparameters() -> None:
    with pytest.raises(ConvtoolError, match="in_channels must be divisible by groups"):
        ConvSpec.create(2, 3, 4, 3, groups=2)
    with pytest.raises(ConvtoolError, match="padding='same' is not supported for strided"):
        ConvSpec.create(2, 3, 3, 3, stride=2, padding="same")
    with pytest.raises(ConvtoolError, match="stride must have 2 element"):
        ConvSpec.create(2, 3, 3, 3, stride=(1, 2, 3))
    with pytest.raises(ConvtoolError, match="padding_mode must be one of"):
        ConvSpec.create(2, 3, 3, 3, padding_mode="mirror")
    with pytest.raises(ConvtoolError, match="output padding must be smaller"):
        ConvSpec.create(2, 3, 3, 3, transposed=True, output_padding=1)
    with pytest.raises(ConvtoolError, match="3, 4 or 5 dims"):
        toeplitz_from_weight(torch.zeros(3, 3), (3, 5))
    with pytest.raises(ConvtoolError, match="expected an nn"):
        toeplitz(nn.Linear(3, 3), (3,))


def test_structural_nnz_counts_padding_and_merges() -> None:
    spec = ConvSpec.create(2, 1, 1, 3, padding=1)
    # 4x4 input, 3x3 kernel, zero padding 1: corner rows see 4 taps, edges 6, interior 9
    assert structural_nnz(spec, (1, 4, 4)) == 4 * 4 + 8 * 6 + 4 * 9
    assert math.prod((16, 16)) >= structural_nnz(spec, (1, 4, 4))


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"), (3, 4, 5)),
        (nn.Conv2d(2, 4, (3, 2), padding=(2, 1), padding_mode="reflect", groups=2), (2, 4, 5)),
        (nn.Conv3d(2, 3, 3, padding=2, padding_mode="replicate"), (2, 3, 2, 4)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (4, 3, 4)),
        (nn.ConvTranspose3d(2, 3, (2, 3, 2), stride=(2, 1, 3), dilation=(1, 2, 1)), (2, 3, 2, 2)),
    ],
)
def test_sparse_indices_are_sorted_and_unique(layer: nn.Module, shape: tuple[int, ...]) -> None:
    """The COO tensor is declared coalesced and the CSR one is built unchecked: verify both."""
    from convtool import matrices

    matrices._template_cached.cache_clear()  # cold: the template is built here
    matrices._adjoint_template_cached.cache_clear()
    layer = layer.double()
    coo = toeplitz(layer, shape, sparse=True)
    ref = torch.sparse_coo_tensor(
        coo.indices(), coo.values(), coo.shape, check_invariants=True
    ).coalesce()
    assert torch.equal(coo.indices(), ref.indices())
    torch.testing.assert_close(coo.values(), ref.values(), rtol=0, atol=0)
    csr = toeplitz(layer, shape, sparse=True, layout="csr")
    rebuilt = torch.sparse_csr_tensor(
        csr.crow_indices(), csr.col_indices(), csr.values(), csr.shape, check_invariants=True
    )
    torch.testing.assert_close(rebuilt.to_dense(), jacobian(layer, shape), rtol=0, atol=1e-12)
