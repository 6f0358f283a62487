"""Region forms against independent oracles: the autograd Jacobian's rows, torch's own conv (and
its gradients), and the unfold formulation of the channel-sum op."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import convtool
from convtool import ConvSpec, ConvtoolError, RegionConv, channel_sum_conv, region_rows, toeplitz
from convtool.region import parse_box, region_counts
from convtool.sizes import structural_nnz, tap_count


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV_T_TYPES = tuple(CONV_T.values())
MODES = ("zeros", "reflect", "replicate", "circular")


def jacobian(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """d layer(x).flatten() / d x.flatten(), column j = layer(e_j) - layer(0): torch's conv on
    the identity basis in one batched call (the map is affine)."""
    n = math.prod(shape)
    with torch.no_grad():
        basis = torch.eye(n).view(n, *shape)
        return (layer(basis) - layer(torch.zeros(1, *shape))).reshape(n, -1).t()


def out_spatial(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(layer(torch.zeros(1, *shape)).shape[2:])


def check_rows(layer: nn.Module, shape: tuple[int, ...], mask: torch.Tensor) -> None:
    """Rows of T at `mask` vs the Jacobian's rows and the full T's rows; counts vs the pattern."""
    jac = jacobian(layer, shape)
    rows = region_rows(layer, shape, mask)
    p_out = math.prod(mask.shape)
    expected_rows = [c * p_out + p for c in range(jac.shape[0] // p_out) for p in range(p_out)]
    expected_rows = [r for r in expected_rows if bool(mask.reshape(-1)[r % p_out])]
    assert rows.tolist() == expected_rows
    expected = jac[rows]
    got = toeplitz(layer, shape, rows=mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # taps folded onto one column (reflect/replicate/circular) may be summed in another order
    torch.testing.assert_close(got, toeplitz(layer, shape)[rows], rtol=1e-13, atol=1e-15)
    spec = ConvSpec.from_module(layer)
    counts = region_counts(spec, shape, mask)
    for layout in ("coo", "csr"):
        s = toeplitz(layer, shape, rows=mask, sparse=True, layout=layout)
        torch.testing.assert_close(s.to_dense(), expected, rtol=0, atol=1e-12)
        assert s.values().numel() == counts["nnz"]
    # Random weights: the structural non-zeros are the Jacobian's non-zeros.
    assert counts["nnz"] == int((expected != 0).sum())
    assert counts["rows"] == expected.shape[0] and counts["cols"] == expected.shape[1]
    full = region_counts(spec, shape, torch.ones_like(mask))
    assert full["nnz"] == structural_nnz(spec, shape)
    assert full["macs"] == tap_count(spec, shape)


def check_region_conv(layer: nn.Module, shape: tuple[int, ...], mask: torch.Tensor) -> None:
    """RegionConv vs the layer at the mask (values, fill, gradients), on its sparse path."""
    n = mask.shape[0] if mask.dim() == len(shape) else 3
    x = torch.randn(n, *shape, requires_grad=True)
    y = layer(x)
    keep = (mask if mask.dim() == y.dim() - 1 else mask[None])[:, None].expand_as(y)
    methods = ["gather", "full", "auto"] + ([] if isinstance(layer, CONV_T_TYPES) else ["tiles"])
    for method in methods:
        z = RegionConv(layer, method=method)(x, mask, fill=-3.0)
        assert z.shape == y.shape
        torch.testing.assert_close(z[keep], y[keep], rtol=1e-12, atol=1e-12)
        assert bool((z[~keep] == -3.0).all())
        grad = torch.randn_like(y)
        params = [x, *layer.parameters()]
        want = torch.autograd.grad((y * grad * keep).sum(), params, retain_graph=True)
        if not z.requires_grad:  # an empty region: nothing depends on the inputs
            assert not keep.any() and all(not bool(w.any()) for w in want)
            continue
        got = torch.autograd.grad((z * grad).sum(), params, allow_unused=True)
        for a, b in zip(got, want, strict=True):
            a = torch.zeros_like(b) if a is None else a
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


CONFIGS = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=1, bias=True),
    dict(kernel_size=2, stride=2, padding=1, dilation=1, groups=2, bias=False),
    dict(kernel_size=3, stride=(1, 2, 3), padding=(2, 1, 0), dilation=(2, 1, 1), groups=1),
    dict(kernel_size=(2, 3, 1), stride=1, padding="same", dilation=(1, 2, 1), groups=4),
]


def _cut(cfg: dict, ndim: int) -> dict:
    return {k: (v[:ndim] if isinstance(v, tuple) else v) for k, v in cfg.items()}


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_conv_region(ndim: int, mode: str, cfg: int) -> None:
    torch.manual_seed(cfg * 10 + ndim)
    layer = CONV[ndim](4, 8, padding_mode=mode, **_cut(CONFIGS[cfg], ndim))
    shape = (4, *(5, 6, 4)[:ndim])
    out = out_spatial(layer, shape)
    mask = torch.rand(out) < 0.4
    check_rows(layer, shape, mask)
    check_region_conv(layer, shape, mask)
    check_region_conv(layer, shape, torch.rand(3, *out) < 0.3)


TRANSPOSED = [
    dict(kernel_size=3, stride=1, padding=0),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1, groups=2),
    dict(kernel_size=(2, 3, 2), stride=(2, 1, 3), padding=(0, 1, 1), output_padding=(1, 0, 2)),
    dict(kernel_size=2, stride=1, dilation=3, output_padding=2, groups=4, bias=False),
]


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("cfg", range(len(TRANSPOSED)))
def test_transposed_region(ndim: int, cfg: int) -> None:
    torch.manual_seed(cfg * 10 + ndim)
    layer = CONV_T[ndim](4, 8, **_cut(TRANSPOSED[cfg], ndim))
    shape = (4, *(3, 4, 2)[:ndim])
    out = out_spatial(layer, shape)
    mask = torch.rand(out) < 0.4
    check_rows(layer, shape, mask)
    check_region_conv(layer, shape, mask)
    check_region_conv(layer, shape, torch.rand(2, *out) < 0.5)


@settings(max_examples=30, deadline=None)
@given(
    transposed=st.booleans(),
    mode=st.sampled_from(MODES),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    groups=st.sampled_from([1, 2]),
    size=st.tuples(st.integers(3, 7), st.integers(3, 7)),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_random_layers(
    transposed: bool,
    mode: str,
    k: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
    size: tuple[int, int],
    density: float,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    layer: nn.Module
    shape = (2, *size)
    if transposed:
        layer = nn.ConvTranspose2d(
            2, 4, k, stride=stride, padding=padding, dilation=dilation, groups=groups
        )
    else:
        if mode == "reflect":
            padding = (min(padding[0], size[0] - 1), min(padding[1], size[1] - 1))
        extent = [d * (kk - 1) + 1 for d, kk in zip(dilation, k, strict=True)]
        if any(e > s + 2 * p for e, s, p in zip(extent, size, padding, strict=True)):
            return
        layer = nn.Conv2d(
            2,
            4,
            k,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=mode,
        )
    try:
        out = ConvSpec.from_module(layer).output_shape(shape)[1:]
    except ConvtoolError:  # e.g. a transposed conv whose padding eats its whole output
        return
    mask = torch.rand(out) < density
    check_rows(layer, shape, mask)
    check_region_conv(layer, shape, mask)


def test_numpy_mask_empty_and_full_regions() -> None:
    layer = nn.Conv2d(3, 5, 3, padding=1)
    shape = (3, 6, 7)
    mask = np.zeros((6, 7), dtype=bool)
    assert toeplitz(layer, shape, rows=mask).shape == (0, 3 * 42)
    assert region_rows(layer, shape, mask).numel() == 0
    mask[2:4, 1:6] = True
    assert toeplitz(layer, shape, rows=mask).shape == (5 * 10, 3 * 42)
    x = torch.randn(2, *shape)
    z = RegionConv(layer)(x, np.zeros((6, 7), dtype=bool), fill=1.5)
    assert bool((z == 1.5).all())
    full = torch.ones(6, 7, dtype=torch.bool)
    torch.testing.assert_close(RegionConv(layer)(x, full), layer(x))
    torch.testing.assert_close(RegionConv(layer)(x[0], full), layer(x)[0])  # unbatched


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("fill", [0.0, 2.5, math.nan, -math.inf])
def test_non_finite_values_outside_the_region_do_not_leak(bad: float, fill: float) -> None:
    # The masking multiply of the 'full' and 'tiles' paths would turn inf * 0 into NaN.
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 16, 16)
    x[:, :, 13, 13] = bad  # read only by outputs 12..14 of each axis
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[1:9, 1:9] = True  # tiles cover 0..7 and 8..15: the second one reads the bad value
    for data in (x, torch.randn(2, 2, 16, 16)):  # also all finite: only the fill is not
        y = F.conv2d(data, layer.weight, layer.bias, padding=1)
        for method in ("full", "tiles", "gather"):
            z = RegionConv(layer, method=method)(data, mask, fill=fill)
            torch.testing.assert_close(z[:, :, mask], y[:, :, mask])
            rest = z[:, :, ~mask]
            assert bool((rest.isnan() if math.isnan(fill) else rest == fill).all()), method


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overflowing_conv_outside_the_region_does_not_leak(dtype: torch.dtype) -> None:
    # Finite input and weights whose conv overflows to inf: the masking multiply must not turn
    # the unselected infs into NaN (the 'full' path proves finiteness from the input, which is
    # smaller than the output here, and must see that it cannot).
    layer = nn.Conv2d(1, 8, 3, padding=1).to(dtype)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.full((1, 1, 6, 6), torch.finfo(dtype).max / 4, dtype=dtype)
    y = layer(x)
    assert bool(y.isinf().any())
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:2] = True
    for fill in (0.0, 2.0):
        z = RegionConv(layer, method="full")(x, mask, fill=fill)
        torch.testing.assert_close(z, torch.where(mask, y, fill))


def test_default_density_threshold_switches_path_exactly() -> None:
    layer = nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular")
    x = torch.randn(2, 4, 12, 12)
    y = layer(x)
    rc = RegionConv(layer)
    for density in (0.02, 0.2, 0.6, 0.9):
        mask = torch.rand(12, 12) < density
        torch.testing.assert_close(rc(x, mask), torch.where(mask, y, 0.0))
        # the cost model: a few positions are gathered, nearly all of them are the full conv
        if density in (0.02, 0.9):
            assert rc.last_method == ("gather" if density < 0.5 else "full")


def test_reused_output_memory_never_shows() -> None:
    # Outputs under 32 MiB reuse the previous output's memory once nothing refers to it: what a
    # caller did to a dropped output must not show, and a held one (or a view of it) must not
    # be written to.
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 10, 10)
    y = layer(x).detach()
    masks = [torch.rand(10, 10) < d for d in (0.1, 0.3, 0.5)]
    for method in ("gather", "tiles"):
        rc = RegionConv(layer, method=method)
        with torch.no_grad():
            first = rc(x, masks[0], fill=1.5)
            first.add_(100.0)  # the caller's own in-place change, then dropped
            del first
            second = rc(x, masks[1], fill=1.5)
            torch.testing.assert_close(second, torch.where(masks[1], y, 1.5))
            view = second[1:]
            del second
            third = rc(x, masks[2], fill=1.5)
        torch.testing.assert_close(view, torch.where(masks[1], y, 1.5)[1:])  # held: untouched
        torch.testing.assert_close(third, torch.where(masks[2], y, 1.5))
    # Gradients stay right over calls that reuse the memory.
    rc = RegionConv(layer, method="gather")
    xg = x.clone().requires_grad_()
    for mask in masks:
        (grad_x,) = torch.autograd.grad(rc(xg, mask).square().sum(), xg)
        (want,) = torch.autograd.grad((layer(xg) * mask).square().sum(), xg)
        torch.testing.assert_close(grad_x, want)


# scattered into the output / assembled; per sample: one of each and an empty one
def test_copies_and_pickles_without_the_reused_output() -> None:
    import copy

    layer = nn.Conv2d(2, 3, 3, padding=1)
    rc = RegionConv(layer)
    x = torch.randn(2, 2, 9, 9)
    mask = torch.rand(9, 9) < 0.3
    with torch.no_grad():
        rc(x, mask)  # leaves the output's memory for the next call
        want = torch.where(mask, layer(x), 0.0)
        for other in (copy.deepcopy(rc), _pickled(rc)):
            torch.testing.assert_close(other(x, mask), want)


def _pickled(module: nn.Module) -> nn.Module:
    import io

    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # our own bytes, written just above


@pytest.mark.parametrize("density", [0.03, 0.5, "per sample"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("fill", [0.0, math.nan])
def test_gather_scatter_and_assembly(density: float | str, grad: bool, fill: float) -> None:
    layer = nn.Conv2d(6, 4, 3, padding=1, padding_mode="zeros", groups=2)
    x = torch.randn(3, 6, 40, 40, requires_grad=grad)
    if isinstance(density, str):
        mask = torch.rand(3, 40, 40) < torch.tensor([0.03, 0.5, 0.0])[:, None, None]
    else:
        mask = torch.rand(40, 40) < density
    with torch.set_grad_enabled(grad):
        z = RegionConv(layer, method="gather")(x, mask, fill=fill)
    y = layer(x)
    keep = (mask if mask.dim() == 3 else mask[None]).unsqueeze(1).expand_as(y)
    torch.testing.assert_close(z[keep], y[keep], rtol=1e-12, atol=1e-12)
    rest = z[~keep]
    assert bool((rest.isnan() if math.isnan(fill) else rest == fill).all())
    if grad:
        g = torch.randn_like(y)
        got = torch.autograd.grad((z * g).nan_to_num().sum(), [x, *layer.parameters()])
        want = torch.autograd.grad((y * g * keep).sum(), [x, *layer.parameters()])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("density", [0.01, 0.5])
@pytest.mark.parametrize("fill", [0.0, -0.0, 2.0])
def test_large_outputs_zero_filled_by_the_system(fill: float, density: float) -> None:
    # Outputs of 32 MiB and more come from numpy: calloc (zero pages) when the fill is +0.
    layer = nn.Conv2d(1, 64, 3, padding=1)
    x = torch.randn(1, 1, 256, 256)  # the output: 64 * 256^2 float64 = 32 MiB
    mask = torch.rand(256, 256) < density
    with torch.no_grad():
        z = RegionConv(layer, method="gather")(x, mask, fill=fill)
        y = layer(x)
    torch.testing.assert_close(z, torch.where(mask, y, fill), rtol=0, atol=0)
    assert bool((torch.signbit(z[:, :, ~mask]) == (math.copysign(1.0, fill) < 0)).all())


def test_box_parsing() -> None:
    mask = parse_box("1:3, 2:", (4, 5))
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[1:3, 2:] = True
    assert torch.equal(mask, expected)
    assert torch.equal(parse_box(":-1", (4,)), torch.tensor([True, True, True, False]))
    for bad in ("1:3", "a:b,1:2", "3:1,0:2", "1:2:3,0:1"):
        with pytest.raises(ConvtoolError):
            parse_box(bad, (4, 5))


def test_bad_masks_are_refused() -> None:
    layer = nn.Conv2d(3, 5, 3)
    with pytest.raises(ConvtoolError, match=r"mask has shape \(5, 5\)"):
        toeplitz(layer, (3, 8, 8), rows=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ConvtoolError, match="dtype bool"):
        toeplitz(layer, (3, 8, 8), rows=torch.ones(6, 6))
    with pytest.raises(ConvtoolError, match="per sample"):
        RegionConv(layer)(torch.randn(2, 3, 8, 8), torch.ones(3, 6, 6, dtype=torch.bool))
    with pytest.raises(ConvtoolError, match="method must be one of"):
        RegionConv(layer, method="fast")  # type: ignore[arg-type]
    with pytest.raises(ConvtoolError, match="transposed"):
        RegionConv(nn.ConvTranspose2d(3, 4, 3), method="tiles")
    with pytest.raises(ConvtoolError):
        RegionConv(nn.Linear(3, 4))


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(stride=2, padding=1),
        dict(stride=(1, 2), padding=(2, 0), dilation=(1, 2)),
    ],
)
def test_channel_sum_conv_matches_unfold(kw: dict) -> None:
    torch.manual_seed(0)
    c, kh, kw_ = 3, 3, 2
    filt = torch.randn(c, kh, kw_)
    x = torch.randn(2, c, 7, 8)
    conv = channel_sum_conv(filt, **kw)
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == kh * kw_
    cols = F.unfold(
        x,
        (kh, kw_),
        dilation=kw.get("dilation", 1),
        padding=kw.get("padding", 0),
        stride=kw.get("stride", 1),
    )
    windows = cols.view(2, c, kh * kw_, -1)  # (N, C, taps, L)
    expected = (windows * filt.reshape(1, c, kh * kw_, 1)).sum(1)  # (N, taps, L)
    y = conv(x)
    torch.testing.assert_close(y.flatten(2), expected, rtol=1e-12, atol=1e-12)
    # It is an ordinary conv for every convtool form.
    jac = jacobian(conv, (c, 7, 8))
    torch.testing.assert_close(toeplitz(conv, (c, 7, 8)), jac, rtol=0, atol=1e-12)
    assert convtool.verify(conv, (c, 7, 8)).passed


def test_channel_sum_conv_refuses_bad_filters() -> None:
    with pytest.raises(ConvtoolError, match="filter must"):
        channel_sum_conv(torch.randn(3))
    with pytest.raises(ConvtoolError, match="floating-point"):
        channel_sum_conv(torch.ones(2, 3, 3, dtype=torch.int64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim,spatial", [(1, (150,)), (2, (21, 19)), (3, (9, 10, 7))])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=2),
        dict(kernel_size=(2, 3, 3), stride=(1, 3, 1), padding=(1, 0, 1), groups=1),
    ],
)
def test_many_tiles(mode: str, ndim: int, spatial: tuple[int, ...], cfg: dict) -> None:
    """Inputs spanning several tiles per axis, regions hitting some of them partially."""
    torch.manual_seed(ndim)
    layer = CONV[ndim](4, 6, padding_mode=mode, **_cut(cfg, ndim))
    shape = (4, *spatial)
    out = out_spatial(layer, shape)
    blob = torch.zeros(out, dtype=torch.bool)
    blob[tuple(slice(o // 3, o // 3 + 3) for o in out)] = True
    check_region_conv(layer, shape, blob | (torch.rand(out) < 0.05))
    check_region_conv(layer, shape, torch.rand(2, *out) < 0.1)


# ---------------------------------------------------------------------------- CLI
def _cli(*args: object):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from convtool.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_toeplitz_roi_box_and_mask(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    import scipy.sparse

    w = torch.randn(4, 3, 3, 3, dtype=torch.float32)
    b = torch.randn(4, dtype=torch.float32)
    np.save(tmp_path / "k.npy", w.numpy())
    np.save(tmp_path / "b.npy", b.numpy())
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").float()
    conv.weight.data, conv.bias.data = w, b  # type: ignore[union-attr]
    flags = ["--input-shape", "3,7,9", "--padding", "1", "--padding-mode", "reflect"]
    flags += ["--bias", tmp_path / "b.npy"]
    res = _cli("toeplitz", tmp_path / "k.npy", *flags, "--roi", "1:3,-2:", "-o", tmp_path / "R.npy")
    assert res.exit_code == 0, res.output
    mask = torch.zeros(7, 9, dtype=torch.bool)
    mask[1:3, -2:] = True
    x = torch.randn(3, 7, 9, dtype=torch.float32)
    with torch.no_grad():
        expected = conv(x[None])[0][:, mask].reshape(-1)  # rows: channel-major, then positions
    rows = np.load(tmp_path / "R.rows.npy")
    assert rows.tolist() == region_rows(conv, (3, 7, 9), mask).tolist()
    got = np.load(tmp_path / "R.npy") @ x.numpy().reshape(-1) + np.load(tmp_path / "R.bias.npy")
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)

    m = np.zeros((7, 9), dtype=bool)
    m[0, 0] = m[6, 8] = True
    np.save(tmp_path / "m.npy", m)
    out = tmp_path / "S.npz"
    res = _cli("toeplitz", tmp_path / "k.npy", *flags, "--roi", tmp_path / "m.npy", "-o", out)
    assert res.exit_code == 0, res.output
    s = scipy.sparse.load_npz(out).toarray()
    with torch.no_grad():
        expected = conv(x[None])[0][:, torch.from_numpy(m)].reshape(-1)
    got = s @ x.numpy().reshape(-1) + np.load(out)["bias"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)

    res = _cli("count-params", tmp_path / "k.npy", *flags, "--roi", tmp_path / "m.npy", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["positions"] == 2 and report["matrix_shape"] == [8, 189]
    assert report["nnz"] == int((s != 0).sum())  # random weights: structural = actual
    assert report["macs"] == 2 * 4 * 3 * 9  # reflect: every tap reads a real value


@pytest.mark.parametrize(
    "roi,message",
    [
        ("1:3", "one 'start:stop' per axis"),
        ("3:1,0:2", "selects no position"),
        ("missing.npy", "does not exist"),
        ("wrong.npy", "mask has shape"),
    ],
)
def test_cli_roi_refusals(tmp_path, roi: str, message: str) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "k.npy", np.ones((2, 1, 3, 3), dtype=np.float32))
    np.save(tmp_path / "wrong.npy", np.ones((5, 5), dtype=bool))  # the output is 4x4
    if roi.endswith(".npy"):
        roi = str(tmp_path / roi)
    for cmd in ("toeplitz", "count-params"):
        res = _cli(cmd, tmp_path / "k.npy", "--input-shape", "1,6,6", "--roi", roi)
        assert res.exit_code == 2
        assert message in res.output and "Traceback" not in res.output
