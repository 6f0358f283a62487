"""Analytic counts (convtool.params) against independent oracles.

Oracles: `sum(p.numel())` of real modules, shapes of real conv outputs, the nnz of the real
sparse matrix, and a conv of ones with ones (which sums exactly the products that read a real
input value) for multiply-adds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from convtool.convert import to_fully_connected, to_locally_connected
from convtool.errors import ConvtoolError
from convtool.matrices import matrix
from convtool.models import convert_model
from convtool.params import ConvLike, count_layers, count_params, layer_counts
from convtool.spec import ConvSpec

_CONV = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
}


@st.composite
def conv_and_shape(draw: Any) -> tuple[nn.Module, tuple[int, ...]]:
    """A small conv module (any kind, padding mode, groups, bias) and a one-sample input."""
    ndim = draw(st.sampled_from([1, 2]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    spatial = tuple(draw(st.integers(1, 8)) for _ in range(ndim))
    bias = draw(st.booleans())
    kwargs: dict[str, Any] = {
        "stride": stride,
        "dilation": dilation,
        "groups": groups,
        "bias": bias,
    }
    if transposed:
        kwargs["padding"] = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
        kwargs["output_padding"] = tuple(
            draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
        )
    else:
        kwargs["padding_mode"] = draw(
            st.sampled_from(["zeros", "reflect", "replicate", "circular"])
        )
        padding = draw(st.sampled_from(["ints", "same", "valid"]))
        if padding == "same":
            kwargs["stride"] = 1
            kwargs["padding"] = "same"
        elif padding == "valid":
            kwargs["padding"] = "valid"
        else:
            kwargs["padding"] = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    conv = _CONV[ndim, transposed](cin, cout, kernel, **kwargs)
    shape = (cin, *spatial)
    try:  # PyTorch decides what is valid (output size, reflect padding < input, ...)
        out = conv(torch.zeros(1, *shape))
    except (RuntimeError, ValueError):
        assume(False)
    assume(out.numel() > 0)  # an empty transposed output has no matrix
    return conv, shape


def _macs_oracle(conv: nn.Module, shape: tuple[int, ...]) -> int:
    """Products that read a real input value: the conv of ones by ones, without bias, summed.

    Zero padding contributes 0 to the sum; reflect/replicate/circular padding copies a real 1.
    """
    ones = type(conv)(**_ctor_args(conv)).double()
    with torch.no_grad():
        ones.weight.fill_(1.0)
        return int(ones(torch.ones(1, *shape, dtype=torch.float64)).sum().item())


def _ctor_args(conv: Any) -> dict[str, Any]:
    args = {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": False,
        "padding_mode": conv.padding_mode,
    }
    if isinstance(conv, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        args["output_padding"] = conv.output_padding
    return args


def test_seed_example_26136_lc_weights() -> None:
    conv = nn.Conv2d(3, 2, 3, bias=False)
    c = count_params(conv, (3, 24, 24)).layers[0]
    assert c.lc_params == 26136 == 22 * 22 * 2 * 3 * 3 * 3
    assert c.conv_params == 54
    assert c.fc_params == (2 * 22 * 22) * (3 * 24 * 24) == 1672704
    assert c.fc_nonzero == 26136  # no padding: every tap reads the input
    assert c.lc_ratio == 484.0
    assert c.conv_macs == c.lc_macs == 26136
    assert c.fc_dense_bytes == 1672704 * 4


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_and_shape())
def test_counts_match_real_modules_and_matrices(case: tuple[nn.Module, tuple[int, ...]]) -> None:
    conv, shape = case
    c = count_params(conv, shape).layers[0]
    assert c.conv_params == sum(p.numel() for p in conv.parameters())
    out = tuple(conv(torch.zeros(1, *shape)).shape[1:])
    assert c.output_shape == out
    rows, cols = math.prod(out), math.prod(shape)
    out_bias = rows if conv.bias is not None else 0
    assert c.fc_params == rows * cols + out_bias

    spec = ConvSpec.from_module(conv)
    coo = matrix(spec, conv.weight.detach(), shape, sparse=True)
    csr = matrix(spec, conv.weight.detach(), shape, sparse=True, layout="csr")
    assert tuple(coo.shape) == (rows, cols)
    assert c.fc_sparse_macs == coo._nnz() == csr.values().numel()
    assert c.fc_nonzero == coo._nnz() + out_bias
    assert c.conv_macs == _macs_oracle(conv, shape)
    itemsize = 4
    assert c.fc_sparse_bytes == coo._nnz() * (itemsize + 8) + (rows + 1) * 8 + out_bias * itemsize

    if spec.transposed:
        assert c.lc_params is None and c.lc_macs is None
        assert any("transposed" in note for note in c.notes)
    else:
        positions = math.prod(out[1:])
        assert c.lc_params == positions * conv.weight.numel() + out_bias
        assert c.lc_macs == c.conv_macs
        if spec.padding_mode == "zeros":
            assert c.conv_macs == c.fc_sparse_macs  # the documented convention


def _stored(module: nn.Module) -> tuple[int, int]:
    """(entries, bytes) a module really holds: parameters, plus sparse buffers' stored values."""
    entries = sum(p.numel() for p in module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    # a sparse T is state, not a buffer (FullyConnected keeps it out of torch.export's reach)
    state = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    for b in state.values():
        if b.layout == torch.sparse_csr:
            entries += b.values().numel()
            nbytes += sum(
                t.numel() * t.element_size()
                for t in (b.values(), b.col_indices(), b.crow_indices())
            )
    return entries, nbytes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_and_shape())
def test_counts_match_converted_modules(case: tuple[nn.Module, tuple[int, ...]]) -> None:
    conv, shape = case
    c = count_params(conv, shape).layers[0]
    dense = to_fully_connected(conv, shape)
    assert c.fc_params == sum(p.numel() for p in dense.parameters())
    assert c.fc_dense_bytes == sum(p.numel() * p.element_size() for p in dense.parameters())
    sparse = to_fully_connected(conv, shape, sparse=True, layout="csr")
    assert (c.fc_nonzero, c.fc_sparse_bytes) == _stored(sparse)
    if not ConvSpec.from_module(conv).transposed:
        lc = to_locally_connected(conv, shape)
        assert c.lc_params == sum(p.numel() for p in lc.parameters())
        assert c.lc_bytes == sum(p.numel() * p.element_size() for p in lc.parameters())


def test_reflect_padding_counts_taps_not_merged_entries() -> None:
    conv = nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect", bias=False)
    c = count_params(conv, (1, 2)).layers[0]
    # input [a, b], reflect-padded [b, a, b, a]: both outputs read a and b, one of them twice.
    assert c.conv_macs == 6 == _macs_oracle(conv, (1, 2))
    assert c.fc_sparse_macs == 4


def test_missing_shape_counts_conv_only() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False))
    report = count_params(model)
    assert [c.conv_params for c in report.layers] == [3 * 4 * 9 + 4, 4 * 4 * 9]
    for c in report.layers:
        assert c.input_shape is None and c.lc_params is None and c.fc_params is None
        assert c.fc_nonzero is None and c.conv_macs is None and c.notes
    t = report.total
    assert t.original_params == sum(p.numel() for p in model.parameters())
    assert t.lc_params is None and t.fc_params is None and t.fc_nonzero is None


class _Tied(nn.Module):
    """conv1 and conv2 share one Parameter; conv3 views conv1's storage through another one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.conv2.weight = self.conv1.weight
        self.conv3 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.conv3.weight = nn.Parameter(self.conv1.weight.data)  # same storage, new Parameter
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.bn(self.conv1(x))))
        return self.head(x.flatten(1))


def _unique_numel(params: Any) -> int:
    """Oracle for tied weights: distinct (storage pointer, offset, shape)."""
    seen = {}
    for p in params:
        seen[(p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))] = p.numel()
    return sum(seen.values())


def test_tied_weights_count_once() -> None:
    model = _Tied()
    report = count_params(model, (1, 2, 6, 6))
    t = report.total
    assert t.original_params == _unique_numel(model.parameters())
    assert t.original_params == 2 * 2 * 9 + 2 + 2 * 2 + (72 * 3 + 3)
    assert t.non_conv_params == 2 * 2 + 72 * 3 + 3
    assert t.conv_params == 2 * 2 * 9 + 2
    names = {c.name: c for c in report.layers}
    assert names["conv2"].tied_to == "conv1" and names["conv3"].tied_to == "conv1"
    # Converting makes three separate LC layers: each costs its own parameters.
    lc = sum(c.lc_params or 0 for c in report.layers)
    assert t.lc_params == lc + t.non_conv_params
    assert lc == 36 * 36 + 36 * 2 + 36 * 36 + 36 * 36  # 6x6 positions x 2*2*9 taps, conv1 bias


def test_model_totals_match_converted_models() -> None:
    model = _Tied()
    report = count_params(model, (1, 2, 6, 6))
    t = report.total
    for to, sparse, expected in (
        ("lc", False, t.lc_params),
        ("fc", False, t.fc_params),
        ("fc", True, t.fc_nonzero),
    ):
        converted = convert_model(model, (1, 2, 6, 6), to=to, sparse=sparse)
        assert _stored(converted)[0] == expected, (to, sparse)


def test_transposed_model_totals_match_partial_conversion() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
        nn.ConvTranspose2d(2, 1, 3, stride=2, bias=False),
        nn.Conv2d(1, 1, 2, bias=False),
    )
    report = count_params(model, (1, 1, 5, 5))
    lc = convert_model(model, (1, 1, 5, 5), to="lc", layers="0,2")
    assert _stored(lc)[0] == report.total.lc_params
    fc = convert_model(model, (1, 1, 5, 5), to="fc")
    assert _stored(fc)[0] == report.total.fc_params
    part = count_params(model, (1, 1, 5, 5), layers="1")
    fc1 = convert_model(model, (1, 1, 5, 5), to="fc", sparse=True, layers="1")
    assert _stored(fc1)[0] == part.total.fc_nonzero


def test_module_called_twice_counts_once() -> None:
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    report = count_params(model, (1, 3, 5, 5))
    assert len(report.layers) == 1  # named_modules lists a repeated module once
    assert report.total.original_params == sum(p.numel() for p in model.parameters())


def test_shared_module_in_a_layer_list_is_converted_once() -> None:
    conv = nn.Conv2d(1, 1, 3, bias=False)

    class L:
        def __init__(self, name: str) -> None:
            self.name, self.module = name, conv
            self.spec = ConvSpec.from_module(conv)
            self.weight, self.bias, self.input_shape = conv.weight, None, (1, 5, 5)

    layers: list[ConvLike] = [L("a"), L("b")]
    report = count_layers(layers)
    assert report.layers[1].shared_with == "a"
    assert report.total.original_params == 9
    assert report.total.lc_params == 9 * 9
    assert report.total.converted == 1


def test_transposed_stays_conv_in_lc_total() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 1, 3, bias=False))
    report = count_params(model, (1, 1, 6, 6))
    conv, tconv = report.layers
    assert tconv.lc_params is None and conv.lc_params == 16 * (18 + 2)
    assert report.total.lc_params == conv.lc_params + 18
    assert report.total.fc_params == conv.fc_params + tconv.fc_params
    assert any("transposed" in note for note in report.notes)


def test_layers_pattern_converts_only_the_listed() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    full = count_params(model, (1, 1, 5, 5))
    part = count_params(model, (1, 1, 5, 5), layers="1")
    assert [c.name for c in part.layers] == ["1"]
    assert part.total.original_params == full.total.original_params == 20 + 38
    assert part.total.lc_params == 20 + full.layers[1].lc_params
    assert part.total.converted == 1 and part.total.layers == 1
    with pytest.raises(ConvtoolError, match="matches no conv layer"):
        count_params(model, (1, 1, 5, 5), layers="layer9.*")


def test_unused_conv_is_listed_without_shape() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Conv1d(1, 1, 2), nn.Conv1d(1, 1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    report = count_params(M(), (1, 1, 4))
    used, unused = report.layers
    assert used.lc_params == 3 * 3 and unused.lc_params is None
    assert "not called" in unused.notes[0]


def test_meta_device_matches_cpu() -> None:
    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3))

    cpu = count_params(net(), (1, 3, 32, 32))
    with torch.device("meta"):
        meta_net = net()
    meta = count_params(meta_net, (1, 3, 32, 32))
    assert meta.to_dict() == cpu.to_dict()


def test_dtype_sets_bytes() -> None:
    c = count_params(nn.Conv1d(1, 1, 2).half(), (1, 4)).layers[0]
    assert c.dtype == "float16" and c.conv_bytes == 3 * 2 and c.lc_bytes == (3 * 2 + 3) * 2


def test_bad_input_is_a_convtool_error() -> None:
    with pytest.raises(ConvtoolError, match="input channels"):
        layer_counts(ConvSpec.create(2, 3, 4, 3), (4, 8, 8))
    with pytest.raises(ConvtoolError, match="no conv layers"):
        count_params(nn.Linear(2, 2))
    with pytest.raises(ConvtoolError, match=r"nn\.Module"):
        count_params("conv")  # type: ignore[arg-type]


BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "count_params.py"


def test_resnet_stem_benchmark_counts() -> None:
    """25 convs at 224x224: the benchmark's counts against hand-computed ones.

    Its time and peak memory are printed by the benchmark, not asserted here: timings are not
    pass/fail tests.
    """
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--json"], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    assert result["conv_layers"] == 25
    # Oracle by hand: stem 7x7/2 3->64 gives 64x112x112; the 24 others are 64x56x56 -> 64x56x56.
    stem_fc = (64 * 112 * 112) * (3 * 224 * 224)
    body_fc = (64 * 56 * 56) ** 2
    assert result["largest_layer_fc_params"] == stem_fc
    assert body_fc > 10**10  # tens of billions per layer
    bn = 25 * 2 * 64
    assert result["fc_params"] == stem_fc + 24 * body_fc + bn
    assert result["original_params"] == 64 * 3 * 49 + 24 * 64 * 64 * 9 + bn
    assert result["lc_params"] == 112 * 112 * 64 * 3 * 49 + 24 * 56 * 56 * 64 * 64 * 9 + bn


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv3d(4, 2, (2, 3, 1), stride=(1, 2, 1), padding=(1, 1, 0), groups=2),
        nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular", bias=False),
        nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2),
    ],
)
def test_3d(conv: nn.Module) -> None:
    shape = (conv.in_channels, 3, 4, 5)  # type: ignore[attr-defined]
    c = count_params(conv, shape).layers[0]
    spec = ConvSpec.from_module(conv)
    t = matrix(spec, conv.weight.detach(), shape, sparse=True)
    assert c.fc_sparse_macs == t._nnz()
    assert c.conv_macs == _macs_oracle(conv, shape)
    assert c.fc_params == sum(p.numel() for p in to_fully_connected(conv, shape).parameters())
    if not spec.transposed:
        lc = to_locally_connected(conv, shape)
        assert c.lc_params == sum(p.numel() for p in lc.parameters())
