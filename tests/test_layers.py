"""LC and FC layers against the original conv (the oracle): values, gradients, training, I/O."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from convtool.convert import to_fully_connected, to_locally_connected
from convtool.errors import ConvtoolError
from convtool.layers import (
    FullyConnected,
    LocallyConnected1d,
    LocallyConnected2d,
    LocallyConnected3d,
)

F64 = {"atol": 1e-10, "rtol": 1e-10}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
LCS = {1: LocallyConnected1d, 2: LocallyConnected2d, 3: LocallyConnected3d}


def make_conv(
    ndim: int, cin: int, cout: int, k: object, *, transposed: bool = False, seed: int = 0, **kw
) -> nn.Module:
    torch.manual_seed(seed)
    conv = (TRANSPOSED if transposed else CONVS)[ndim](cin, cout, k, **kw).double()
    with torch.no_grad():  # non-zero bias even where the default init would be tiny
        if conv.bias is not None:
            conv.bias.uniform_(-1, 1)
    return conv


def batch(shape: tuple[int, ...], n: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=dtype)


# (ndim, C_in, C_out, spatial, kernel, conv kwargs): every axis of the LC grid.
LC_GRID = [
    (1, 3, 4, (11,), 3, {}),
    (1, 4, 6, (12,), 3, {"stride": 2, "dilation": 2, "padding": 3, "groups": 2}),
    (1, 2, 4, (9,), 4, {"padding": "same", "padding_mode": "reflect", "bias": False}),
    (1, 3, 3, (8,), 2, {"padding": 2, "padding_mode": "circular", "stride": 3}),
    (1, 2, 2, (6,), 3, {"padding": "valid", "padding_mode": "replicate"}),
    (2, 3, 4, (7, 8), 3, {}),
    (2, 4, 6, (9, 8), (2, 3), {"stride": (2, 1), "padding": (1, 2), "groups": 2}),
    (2, 2, 3, (8, 9), 3, {"dilation": (2, 1), "padding": "same", "padding_mode": "reflect"}),
    (2, 3, 2, (6, 7), (3, 2), {"padding": (2, 1), "padding_mode": "replicate", "stride": 2}),
    (2, 4, 4, (7, 7), 3, {"padding": 1, "padding_mode": "circular", "groups": 4, "bias": False}),
    (2, 6, 6, (8, 8), 4, {"padding": "same", "groups": 3}),
    (2, 2, 3, (5, 6), 1, {"stride": (2, 3)}),
    (2, 2, 3, (5, 5), 5, {"padding": "valid"}),
    (3, 2, 3, (5, 6, 4), 3, {"padding": 1}),
    (3, 4, 4, (6, 5, 6), (2, 3, 2), {"stride": (2, 1, 2), "dilation": (1, 2, 1), "groups": 2}),
    (3, 2, 2, (4, 5, 4), 3, {"padding": "same", "padding_mode": "reflect", "bias": False}),
    (3, 2, 2, (4, 4, 5), 2, {"padding": 1, "padding_mode": "circular", "stride": 2}),
    (3, 1, 2, (4, 4, 4), 3, {"padding": (1, 0, 2), "padding_mode": "replicate"}),
]


@pytest.mark.parametrize("ndim, cin, cout, spatial, k, kw", LC_GRID)
def test_lc_equals_conv_values_and_gradients(ndim, cin, cout, spatial, k, kw):
    conv = make_conv(ndim, cin, cout, k, **kw)
    lc = to_locally_connected(conv, (cin, *spatial))
    x = batch((cin, *spatial)).requires_grad_()
    y_conv = conv(x)
    x_lc = x.detach().clone().requires_grad_()
    y_lc = lc(x_lc)
    torch.testing.assert_close(y_lc, y_conv, **F64)
    assert y_lc.shape == y_conv.shape and y_lc.is_contiguous()

    # With tied kernels, d/d(conv weight) = sum over positions of the per-position gradients.
    g = torch.randn_like(y_conv)
    y_conv.backward(g)
    y_lc.backward(g)
    torch.testing.assert_close(x_lc.grad, x.grad, **F64)
    positions = tuple(range(ndim))
    grad_w = lc.weight.grad.sum(positions)
    torch.testing.assert_close(grad_w, conv.weight.grad, **F64)
    if conv.bias is not None:
        grad_b = lc.bias.grad.sum(tuple(range(1, ndim + 1)))
        torch.testing.assert_close(grad_b, conv.bias.grad, **F64)
    else:
        assert lc.bias is None


# (ndim, C_in, C_out, spatial, kernel, transposed, conv kwargs)
FC_GRID = [
    (1, 3, 4, (10,), 3, False, {"stride": 2, "padding": 1, "padding_mode": "reflect"}),
    (1, 4, 2, (9,), 3, False, {"padding": "same", "dilation": 2, "groups": 2, "bias": False}),
    (2, 3, 4, (6, 7), 3, False, {"padding": 1, "padding_mode": "circular"}),
    (2, 4, 6, (7, 6), (2, 3), False, {"stride": (1, 2), "groups": 2, "padding_mode": "zeros"}),
    (2, 2, 3, (6, 6), 3, False, {"padding": "valid", "padding_mode": "replicate"}),
    (3, 2, 2, (4, 5, 4), 2, False, {"padding": 1, "padding_mode": "replicate", "stride": 2}),
    (1, 3, 4, (5,), 3, True, {"stride": 2, "output_padding": 1}),
    (2, 4, 6, (4, 5), (3, 2), True, {"stride": (2, 1), "padding": 1, "groups": 2}),
    (2, 2, 3, (3, 4), 3, True, {"dilation": 2, "bias": False}),
    (3, 2, 2, (3, 3, 2), 2, True, {"stride": (2, 1, 2), "output_padding": (1, 0, 1)}),
]


@pytest.mark.parametrize("ndim, cin, cout, spatial, k, transposed, kw", FC_GRID)
@pytest.mark.parametrize("sparse, layout", [(False, "csr"), (True, "csr"), (True, "coo")])
def test_fc_equals_conv(ndim, cin, cout, spatial, k, transposed, kw, sparse, layout):
    conv = make_conv(ndim, cin, cout, k, transposed=transposed, **kw)
    fc = to_fully_connected(conv, (cin, *spatial), sparse=sparse, layout=layout)
    assert fc.layout == (layout if sparse else "dense")
    x = batch((cin, *spatial)).requires_grad_()
    y_conv = conv(x)
    x_fc = x.detach().clone().requires_grad_()
    y_fc = fc(x_fc)
    torch.testing.assert_close(y_fc, y_conv, **F64)
    g = torch.randn_like(y_conv)
    y_conv.backward(g)
    y_fc.backward(g)
    torch.testing.assert_close(x_fc.grad, x.grad, **F64)
    torch.testing.assert_close(fc(x[0].detach()), y_conv[0].detach(), **F64)  # unbatched


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_float32_matches_at_float32_rounding(ndim):
    torch.manual_seed(1)
    conv = CONVS[ndim](4, 6, 3, padding=1, stride=2, groups=2, padding_mode="reflect")
    shape = (4, *(7,) * ndim)
    x = torch.randn(2, *shape)
    y = conv(x)
    torch.testing.assert_close(to_locally_connected(conv, shape)(x), y)
    torch.testing.assert_close(to_fully_connected(conv, shape)(x), y)
    torch.testing.assert_close(to_fully_connected(conv, shape, sparse=True)(x), y)


def test_lc_channels_last_input_and_frozen_weights():
    conv = make_conv(2, 4, 4, 3, padding=1, groups=2)
    lc = to_locally_connected(conv, (4, 6, 7)).requires_grad_(False)
    x = batch((4, 6, 7)).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = lc(x)
    torch.testing.assert_close(y, conv(x), **F64)
    (grad,) = torch.autograd.grad(y.sum(), x)
    (expected,) = torch.autograd.grad(conv(x).sum(), x)
    torch.testing.assert_close(grad, expected, **F64)


def test_lc_unbatched_input_and_batched_input_shape():
    conv = make_conv(2, 3, 4, 3, padding=1)
    lc = to_locally_connected(conv, (2, 3, 6, 5))  # a leading batch in the shape is accepted
    x = batch((3, 6, 5), n=1)[0]
    torch.testing.assert_close(lc(x), conv(x), **F64)
    assert lc(x).shape == (4, 6, 5)


# ----------------------------------------------------------------------------- properties
@st.composite
def conv_cases(draw: st.DrawFn, transposed_ok: bool) -> tuple[nn.Module, tuple[int, ...]]:
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    ints = st.tuples(*[st.integers(1, 3)] * ndim)
    kernel, stride = draw(ints), draw(ints)
    dilation = draw(st.tuples(*[st.integers(1, 2)] * ndim))
    size = draw(st.tuples(*[st.integers(1, 8 if ndim < 3 else 5)] * ndim))
    bias = draw(st.booleans())
    transposed = transposed_ok and draw(st.booleans())
    kw: dict[str, object] = {"stride": stride, "dilation": dilation, "groups": groups}
    pads = st.tuples(*[st.integers(0, 2)] * ndim)
    if transposed:
        kw["padding"] = draw(pads)
        kw["output_padding"] = tuple(
            draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
        )
    else:
        kw["padding"] = draw(st.one_of(pads, st.sampled_from(["same", "valid"])))
        kw["padding_mode"] = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    try:  # torch decides what is valid; our layers must then accept it
        conv = make_conv(ndim, cin, cout, kernel, transposed=transposed, bias=bias, **kw)
        conv(torch.zeros(1, cin, *size, dtype=torch.float64))
    except (RuntimeError, ValueError):
        assume(False)
    return conv, (cin, *size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_cases(transposed_ok=False), n=st.sampled_from([1, 2, 17]))
def test_property_lc_equals_conv(case, n):
    conv, shape = case
    lc = to_locally_connected(conv, shape)
    x = batch(shape, n=n).requires_grad_()
    y = conv(x)
    x_lc = x.detach().clone().requires_grad_()
    y_lc = lc(x_lc)
    torch.testing.assert_close(y_lc, y, **F64)
    g = torch.randn_like(y)
    y.backward(g)
    y_lc.backward(g)
    torch.testing.assert_close(x_lc.grad, x.grad, **F64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_cases(transposed_ok=True), sparse=st.booleans())
def test_property_fc_equals_conv(case, sparse):
    conv, shape = case
    fc = to_fully_connected(conv, shape, sparse=sparse)
    x = batch(shape, n=2)
    torch.testing.assert_close(fc(x), conv(x), **F64)


@pytest.mark.parametrize(
    "ndim, cin, cout, spatial, k, kw",
    [
        (1, 4, 6, (9,), 3, dict(stride=2, dilation=2, groups=2, padding_mode="reflect", padding=2)),
        (2, 4, 4, (6, 7), (2, 3), dict(dilation=(2, 1), groups=4, padding="same")),
        (3, 2, 3, (4, 5, 3), 2, dict(padding=1, padding_mode="circular")),
    ],
)
@pytest.mark.parametrize("n", [1, 5, 40])  # both input-gradient layouts (small and large batch)
def test_lc_gradients_at_every_batch_size(ndim, cin, cout, spatial, k, kw, n):
    conv = make_conv(ndim, cin, cout, k, **kw)
    lc = to_locally_connected(conv, (cin, *spatial))
    x = batch((cin, *spatial), n=n).requires_grad_()
    x_lc = x.detach().clone().requires_grad_()
    g = torch.randn_like(conv(x))
    conv(x).backward(g)
    lc(x_lc).backward(g)
    torch.testing.assert_close(x_lc.grad, x.grad, **F64)
    torch.testing.assert_close(lc.weight.grad.sum(tuple(range(ndim))), conv.weight.grad, **F64)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "n, ndim, cin, cout, spatial, k, kw",
    [
        (2, 1, 2, 4, (7,), 3, {"stride": 2, "dilation": 2, "padding": 2, "groups": 2}),
        (1, 1, 2, 2, (6,), 3, {"padding": 1, "padding_mode": "replicate"}),  # the N=1 path
        (2, 2, 2, 2, (3, 4), (2, 3), {"padding": 1, "padding_mode": "reflect"}),
        (2, 3, 1, 2, (3, 2, 4), 2, {"stride": (1, 2, 1), "padding_mode": "circular", "padding": 1}),
    ],
)
def test_lc_gradcheck(n, ndim, cin, cout, spatial, k, kw):
    torch.manual_seed(0)
    lc = LCS[ndim](cin, cout, spatial, k, dtype=torch.float64, **kw)
    with torch.no_grad():  # per-position kernels all different
        lc.weight.normal_()
        assert lc.bias is not None
        lc.bias.normal_()
    x = torch.randn(n, cin, *spatial, dtype=torch.float64, requires_grad=True)

    def run(x, w, b):
        return torch.func.functional_call(lc, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(run, (x, lc.weight, lc.bias))


# ----------------------------------------------------------------------------- training
def test_lc_trains_away_from_sharing_and_projects_back():
    conv = make_conv(2, 3, 4, 3, padding=1, padding_mode="replicate")
    lc = to_locally_connected(conv, (3, 6, 6))
    x = batch((3, 6, 6), n=4)
    assert lc.sharing_distance() == 0.0
    torch.testing.assert_close(lc.shared_kernel(), conv.weight, **F64)
    torch.testing.assert_close(lc.kernels()[2, 3], conv.weight, **F64)
    assert lc.kernels().shape == (6, 6, 4, 3, 3, 3)
    back = lc.to_conv()
    assert isinstance(back, nn.Conv2d) and back.padding_mode == "replicate"
    torch.testing.assert_close(back.weight, conv.weight, **F64)
    torch.testing.assert_close(back(x), conv(x), **F64)

    before = lc(x).detach()
    opt = torch.optim.SGD(lc.parameters(), lr=0.5)
    target = torch.randn_like(before)
    opt.zero_grad()
    torch.nn.functional.mse_loss(lc(x), target).backward()
    opt.step()
    after = lc(x).detach()
    assert not torch.allclose(after, before)
    kernels = lc.kernels()
    assert not torch.allclose(kernels[0, 0], kernels[3, 2])
    assert lc.sharing_distance() > 0
    projected = lc.to_conv()
    torch.testing.assert_close(projected.weight, lc.shared_kernel(), **F64)
    assert projected.bias is not None and lc.bias is not None
    torch.testing.assert_close(projected.bias, lc.bias.mean((1, 2)), **F64)


def test_fc_dense_trains_like_linear():
    conv = make_conv(1, 2, 3, 3, padding=1)
    fc = to_fully_connected(conv, (2, 8))
    assert isinstance(fc.weight, nn.Parameter) and fc.weight.shape == (24, 16)
    assert fc.bias is not None and fc.bias.shape == (24,)
    x = batch((2, 8))
    before = fc(x).detach()
    fc(x).square().sum().backward()
    torch.optim.SGD(fc.parameters(), lr=0.1).step()
    assert not torch.allclose(fc(x), before)


def test_fc_sparse_weight_is_a_frozen_buffer():
    conv = make_conv(2, 2, 3, 3)
    fc = to_fully_connected(conv, (2, 5, 5), sparse=True)
    assert [name for name, _ in fc.named_parameters()] == ["bias"]
    # sparse T travels in the state_dict; the COO index buffers the exportable forward reads
    # are non-persistent and alias T's storage (only CSR's row index is new memory)
    assert list(fc.state_dict()) == ["weight", "bias"]
    assert fc.weight.layout == torch.sparse_csr
    assert fc.state_dict()["weight"].layout == torch.sparse_csr
    assert fc._values.data_ptr() == fc.weight.values().data_ptr()
    assert fc._cols.data_ptr() == fc.weight.col_indices().data_ptr()
    assert fc.weight.values().numel() == 3 * 9 * 2 * 9  # positions x taps, no padding


# ----------------------------------------------------------------------------- state_dict, export
def _reload(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("sparse, layout", [(False, "csr"), (True, "csr"), (True, "coo")])
def test_fc_state_dict_round_trip(sparse, layout):
    shape = (2, 5, 6)
    trained = to_fully_connected(
        make_conv(2, 2, 3, 3, padding=1, seed=1), shape, sparse=sparse, layout=layout
    )
    with torch.no_grad():
        assert trained.bias is not None
        trained.bias.add_(1.0)
    fresh = to_fully_connected(
        make_conv(2, 2, 3, 3, padding=1, seed=2), shape, sparse=sparse, layout=layout
    )
    fresh.load_state_dict(_reload(trained.state_dict()))
    x = batch(shape)
    torch.testing.assert_close(fresh(x), trained(x), **F64)


def test_lc_state_dict_round_trip():
    lc = LocallyConnected2d(2, 3, (6, 5), 3, padding="same", dtype=torch.float64)
    fresh = LocallyConnected2d(2, 3, (6, 5), 3, padding="same", dtype=torch.float64)
    x = batch((2, 6, 5))
    assert not torch.allclose(fresh(x), lc(x))
    fresh.load_state_dict(_reload(lc.state_dict()))
    torch.testing.assert_close(fresh(x), lc(x), **F64)


@pytest.mark.parametrize("form", ["lc", "dense", "csr", "coo"])
def test_torch_export_runs_like_the_conv(form):
    conv = make_conv(2, 2, 4, 3, padding=1, padding_mode="reflect", groups=2)
    shape = (2, 6, 5)
    if form == "lc":
        module: nn.Module = to_locally_connected(conv, shape)
    else:
        module = to_fully_connected(conv, shape, sparse=form != "dense", layout=form)
    x = batch(shape, n=2)
    program = torch.export.export(module, (x,))
    x2 = batch(shape, n=2)
    torch.testing.assert_close(program.module()(x2), conv(x2), **F64)


# ----------------------------------------------------------------------------- construction
def test_lc_constructor_init_and_repr():
    lc = LocallyConnected2d(4, 6, (10, 9), 3, stride=2, padding=1, groups=2, bias=True)
    assert lc.output_size == (5, 5)
    assert lc.weight.shape == (5, 5, 6, 2, 3, 3)
    assert lc.bias is not None and lc.bias.shape == (6, 5, 5)
    bound = 1 / (2 * 9) ** 0.5
    assert lc.weight.abs().max() <= bound and lc.weight.std() > bound / 4
    text = repr(lc)
    assert "LocallyConnected2d(4, 6, input_size=(10, 9), output_size=(5, 5)" in text
    assert "groups=2" in text
    x = torch.randn(3, 4, 10, 9)
    assert lc(x).shape == (3, 6, 5, 5)
    assert LocallyConnected1d(1, 1, 5, 2, bias=False).bias is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_channels": 3, "groups": 2}, "in_channels must be divisible by groups"),
        ({"input_size": (5, 0)}, "input_size"),
        ({"input_size": (5, 5, 5)}, "input_size"),
        ({"kernel_size": 9}, "kernel size can't be greater"),
        ({"padding": 5, "padding_mode": "reflect"}, "reflect padding"),
        ({"padding": "same", "stride": 2}, "padding='same'"),
        ({"padding_mode": "mirror"}, "padding_mode"),
    ],
)
def test_lc_constructor_errors(kwargs, message):
    args = {"in_channels": 2, "out_channels": 2, "input_size": (5, 5), "kernel_size": 3}
    with pytest.raises(ConvtoolError, match=message):
        LocallyConnected2d(**{**args, **kwargs})


def test_forward_rejects_wrong_inputs_in_one_line():
    lc = LocallyConnected2d(2, 3, (5, 5), 3)
    fc = to_fully_connected(make_conv(2, 2, 3, 3), (2, 5, 5))
    for layer in (lc, fc):
        for bad in (torch.zeros(1, 3, 5, 5), torch.zeros(1, 2, 5, 6), torch.zeros(2, 5)):
            with pytest.raises(ConvtoolError, match=r"expects input \(N, 2, 5, 5\)") as info:
                layer(bad.to(layer.weight.dtype))
            assert "\n" not in str(info.value)
    with pytest.raises(ConvtoolError, match="dtype"):
        lc(torch.zeros(1, 2, 5, 5, dtype=torch.float64))


def test_conversion_errors():
    with pytest.raises(ConvtoolError, match=r"Conv1d/2d/3d.*to_fully_connected"):
        to_locally_connected(nn.ConvTranspose2d(2, 2, 3), (2, 5, 5))
    with pytest.raises(ConvtoolError, match=r"expected an nn\.Conv"):
        to_locally_connected(nn.Linear(2, 2), (2, 5))
    with pytest.raises(ConvtoolError, match="input channels"):
        to_fully_connected(nn.Conv2d(2, 2, 3), (3, 5, 5))
    with pytest.raises(ConvtoolError, match="matrix has shape"):
        FullyConnected((2, 3), (4,), torch.zeros(4, 5))


def test_dense_fc_refuses_a_matrix_larger_than_memory():
    # 4 x 256 x 256 in and out: dense T is 256 GiB, more than the machine has; sparse is small
    conv = nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(ConvtoolError, match="sparse=True"):
        to_fully_connected(conv, (4, 256, 256))
    assert to_fully_connected(conv, (4, 256, 256), sparse=True).layout == "csr"


def test_fully_connected_without_a_conv():
    t = torch.arange(12.0).reshape(3, 4)
    fc = FullyConnected((2, 2), (3,), t, torch.ones(3))
    x = torch.randn(5, 2, 2)
    torch.testing.assert_close(fc(x), x.reshape(5, 4) @ t.T + 1)
    sparse = FullyConnected((2, 2), (3,), t.to_sparse_csr())
    torch.testing.assert_close(sparse(x), x.reshape(5, 4) @ t.T)


# ----------------------------------------------------------------------------- code paths
CHUNK_CASES = [
    (1, 4, 6, (12,), 3, {"stride": 2, "dilation": 2, "padding": 3, "groups": 2}),
    (2, 4, 6, (9, 8), (2, 3), {"stride": (2, 1), "padding": (1, 2), "groups": 2}),
    (2, 2, 3, (8, 9), 3, {"dilation": (2, 1), "padding": "same", "padding_mode": "reflect"}),
    (3, 4, 4, (6, 5, 6), (2, 3, 2), {"stride": (2, 1, 2), "dilation": (1, 2, 1), "groups": 2}),
]


@pytest.mark.parametrize("ndim, cin, cout, spatial, k, kw", CHUNK_CASES)
@pytest.mark.parametrize("n", [1, 3, 20, 40])  # single sample, tap-major, gathered rows
def test_lc_in_row_chunks_equals_conv(monkeypatch, ndim, cin, cout, spatial, k, kw, n):
    """One output row per chunk (the layer works a few rows at a time on large inputs)."""
    import convtool.layers as layers

    monkeypatch.setattr(layers, "_CHUNK_BYTES", 1)
    conv = make_conv(ndim, cin, cout, k, **kw)
    lc = to_locally_connected(conv, (cin, *spatial))
    x = batch((cin, *spatial), n=n).requires_grad_()
    x_lc = x.detach().clone().requires_grad_()
    y, y_lc = conv(x), lc(x_lc)
    torch.testing.assert_close(y_lc, y, **F64)
    g = torch.randn_like(y)
    y.backward(g)
    y_lc.backward(g)
    torch.testing.assert_close(x_lc.grad, x.grad, **F64)
    torch.testing.assert_close(lc.weight.grad.sum(tuple(range(ndim))), conv.weight.grad, **F64)
    torch.testing.assert_close(lc.bias.grad.sum(tuple(range(1, ndim + 1))), conv.bias.grad, **F64)


@pytest.mark.parametrize("n", [1, 2])
def test_lc_gradcheck_in_row_chunks(monkeypatch, n):
    import convtool.layers as layers

    monkeypatch.setattr(layers, "_CHUNK_BYTES", 1)
    torch.manual_seed(0)
    lc = LocallyConnected2d(2, 4, (4, 5), (2, 3), stride=(1, 2), padding=1, groups=2)
    lc = lc.double()
    with torch.no_grad():
        lc.weight.normal_()
        lc.bias.normal_()
    x = torch.randn(n, 2, 4, 5, dtype=torch.float64, requires_grad=True)

    def run(x, w, b):
        return torch.func.functional_call(lc, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(run, (x, lc.weight, lc.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim, cin, cout, spatial, k, kw", CHUNK_CASES)
def test_lc_single_sample_numpy_and_torch_paths_equal_conv(
    monkeypatch, dtype, ndim, cin, cout, spatial, k, kw
):
    """At N=1 the forward multiplies with numpy on plain CPU tensors, with torch otherwise."""
    import convtool.layers as layers

    conv = make_conv(ndim, cin, cout, k, **kw).to(dtype)
    lc = to_locally_connected(conv, (cin, *spatial))
    x = batch((cin, *spatial), n=1, dtype=dtype)
    tol = F64 if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():
        expected = conv(x)
        fast = lc(x)
        unbatched = lc(x[0])
        monkeypatch.setattr(layers, "_plain_cpu", lambda *tensors: False)
        plain = lc(x)
    torch.testing.assert_close(fast, expected, **tol)
    torch.testing.assert_close(plain, expected, **tol)
    torch.testing.assert_close(unbatched, expected[0], **tol)


def test_lc_single_sample_path_is_traced_by_torch_not_numpy():
    conv = make_conv(2, 2, 4, 3, padding=1)
    lc = to_locally_connected(conv, (2, 6, 5))
    x = batch((2, 6, 5), n=1)
    program = torch.export.export(lc, (x,))
    x2 = batch((2, 6, 5), n=1)
    torch.testing.assert_close(program.module()(x2), conv(x2), **F64)


@pytest.mark.parametrize("ndim, cin, cout, spatial, k, kw", CHUNK_CASES)
def test_lc_gradients_on_the_torch_only_paths_equal_conv(
    monkeypatch, ndim, cin, cout, spatial, k, kw
):
    """Traced or wrapped tensors take the torch-only paths (no numpy, no chunk-by-chunk
    transposes of the output gradient): their gradients still equal the conv's."""
    import convtool.layers as layers

    monkeypatch.setattr(layers, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(layers, "_eager", lambda *tensors: False)
    monkeypatch.setattr(layers, "_plain_cpu", lambda *tensors: False)
    conv = make_conv(ndim, cin, cout, k, **kw)
    lc = to_locally_connected(conv, (cin, *spatial))
    x = batch((cin, *spatial), n=3).requires_grad_()
    x_lc = x.detach().clone().requires_grad_()
    y, y_lc = conv(x), lc(x_lc)
    torch.testing.assert_close(y_lc, y, **F64)
    g = torch.randn_like(y)
    y.backward(g)
    y_lc.backward(g)
    torch.testing.assert_close(x_lc.grad, x.grad, **F64)
    torch.testing.assert_close(lc.weight.grad.sum(tuple(range(ndim))), conv.weight.grad, **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_matmul_on_every_layout(dtype):
    """numpy where both operands are BLAS matrices as they lie, torch.bmm on other layouts."""
    from convtool.layers import _blas_layout, _matmuls

    torch.manual_seed(0)
    a = torch.randn(5, 4, 6, dtype=dtype)
    b = torch.randn(5, 7, 3, dtype=dtype)
    layouts = {
        "plain": (a, b[:, :6]),
        "transposed": (
            a.transpose(1, 2).contiguous().transpose(1, 2),
            b[:, :6].transpose(1, 2).contiguous().transpose(1, 2),
        ),
        "strided": (a[:, :, ::2], b[:, 1::2]),  # neither stride is 1: not a BLAS matrix
    }
    assert not _blas_layout(layouts["strided"][0])
    for name, (x, y) in layouts.items():
        expected = torch.stack([x[i].contiguous() @ y[i].contiguous() for i in range(5)])
        tol = {} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(_matmuls(x, y), expected, **tol, msg=name)
        out = torch.empty_like(expected)
        _matmuls(x, y, out=out)
        torch.testing.assert_close(out, expected, **tol, msg=name)


def test_lc_weight_gradient_buffer_is_reused_only_when_nothing_holds_it():
    """The weight gradient is written into the previous one's pages once it was dropped, and
    never into a gradient someone still holds."""
    conv = make_conv(2, 2, 3, 3, padding=1)
    lc = to_locally_connected(conv, (2, 5, 4))
    x = batch((2, 5, 4), n=3)
    grads = [torch.randn(3, 3, 5, 4, dtype=torch.float64) for _ in range(3)]

    def expected(g):
        # per-position weight gradient from torch's own unfolding of the input
        cols = torch.nn.functional.unfold(x, 3, padding=1)  # (N, C_in*9, P)
        gw = torch.einsum("ncp,nkp->pck", g.flatten(2), cols)
        return gw.reshape(lc.weight.shape)

    wanted = [expected(g) for g in grads]
    lc(x).backward(grads[0])
    held = lc.weight.grad
    lc.weight.grad = None
    lc(x).backward(grads[1])  # `held` is still referenced: a fresh array
    assert lc.weight.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, wanted[0], **F64)
    torch.testing.assert_close(lc.weight.grad, wanted[1], **F64)
    first = lc.weight.grad.data_ptr()
    lc.weight.grad = None
    lc(x).backward(grads[2])  # nothing holds the previous one: its pages are reused
    assert lc.weight.grad.data_ptr() == first
    torch.testing.assert_close(lc.weight.grad, wanted[2], **F64)
    # accumulation into a held gradient still adds
    lc(x).backward(grads[0])
    torch.testing.assert_close(lc.weight.grad, wanted[2] + wanted[0], **F64)


@pytest.mark.parametrize("n", [1, 3, 40])  # single sample, tap-major, gathered rows
def test_lc_bfloat16_values_and_gradients_follow_the_conv(n):
    """bfloat16 takes torch's products (numpy has no bfloat16) on every path."""
    conv = make_conv(2, 4, 6, (2, 3), stride=(2, 1), padding=1, groups=2)
    lc = to_locally_connected(conv, (4, 7, 6)).to(torch.bfloat16)
    x = batch((4, 7, 6), n=n)
    x_lc = x.to(torch.bfloat16).requires_grad_()
    y, y_lc = conv(x.requires_grad_()), lc(x_lc)
    assert y_lc.dtype == torch.bfloat16
    tol = {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(y_lc.double(), y, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_lc.backward(g.to(torch.bfloat16))
    torch.testing.assert_close(x_lc.grad.double(), x.grad, **tol)
    gw = lc.weight.grad.double().sum((0, 1))
    scale = conv.weight.grad.abs().max().item()
    torch.testing.assert_close(gw, conv.weight.grad, atol=0.03 * scale, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stacked_matmul_over_two_batch_dims_into_a_strided_out(dtype):
    """Two batch dims (positions, groups), `out` a permuted view of a tap-major buffer: numpy
    writes into it in place; other dtypes go through torch and are copied in."""
    from convtool.layers import _matmuls

    torch.manual_seed(0)
    a = torch.randn(3, 2, 6, 4, dtype=torch.float64).to(dtype).transpose(2, 3)  # (3, 2, 4, 6)
    b = torch.randn(3, 2, 6, 5, dtype=dtype)
    buf = torch.zeros(2, 4, 3, 5, dtype=dtype)  # (G, R, P, M): row stride P*M
    out = buf.permute(2, 0, 1, 3)  # (P, G, R, M)
    expected = torch.einsum("pgrk,pgkm->pgrm", a.double(), b.double())
    _matmuls(a, b, out=out)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(buf.permute(2, 0, 1, 3).double(), expected, **tol)
