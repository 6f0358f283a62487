"""Fuzz: random conv hyperparameters and shapes, valid and invalid.

Every case either matches torch exactly (T equals the layer's Jacobian, T @ x + b equals the
layer's output) or raises ConvtoolError, never another exception, and only when torch also
refuses the combination.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from convtool import ConvSpec, ConvtoolError, bias_vector, toeplitz, toeplitz_from_weight

CONV = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}


def per_dim(data: st.DataObject, ndim: int, lo: int, hi: int, bad: int) -> Any:
    """Mostly an int in [lo, hi] or a tuple of `ndim` of them; now and then an invalid value
    (`bad`) or a tuple of the wrong length."""
    value = (
        st.one_of(st.integers(lo, hi), st.just(bad))
        if data.draw(st.integers(0, 12)) == 0
        else st.integers(lo, hi)
    )
    kind = data.draw(st.sampled_from(["int"] * 3 + ["tuple"] * 6 + ["wrong"]))
    if kind == "int":
        return data.draw(value)
    wrong = [n for n in (1, 2, 3, 4) if n != ndim]
    length = ndim if kind != "wrong" or ndim == 1 else data.draw(st.sampled_from(wrong))
    return tuple(data.draw(value) for _ in range(length))


@given(data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_matches_torch_or_raises_convtool_error(data: st.DataObject) -> None:
    ndim = data.draw(st.integers(1, 3))
    transposed = data.draw(st.booleans())
    groups = data.draw(st.sampled_from([1, 1, 1, 2, 3]))
    cin = groups * data.draw(st.integers(1, 2)) + data.draw(st.sampled_from([0] * 8 + [1]))
    cout = groups * data.draw(st.integers(1, 2)) + data.draw(st.sampled_from([0] * 8 + [1]))
    kwargs: dict[str, Any] = {
        "kernel_size": per_dim(data, ndim, 1, 4, 0),
        "stride": per_dim(data, ndim, 1, 3, 0),
        "dilation": per_dim(data, ndim, 1, 2, 0),
        "groups": groups,
        "bias": data.draw(st.booleans()),
        "padding_mode": data.draw(
            st.sampled_from(["zeros"] * 3 + ["reflect", "replicate", "circular"] * 2 + ["mirror"])
        ),
    }
    if data.draw(st.integers(0, 4)) == 0:
        kwargs["padding"] = data.draw(st.sampled_from(["same", "same", "valid", "valid", "full"]))
    else:
        kwargs["padding"] = per_dim(data, ndim, 0, 3, -1)
    if transposed:
        kwargs["output_padding"] = per_dim(data, ndim, 0, 2, 3)
    shape = (
        data.draw(st.sampled_from([cin] * 8 + [cin + 1])),
        *(data.draw(st.sampled_from([0] + [1, 2, 3, 4, 5, 6] * 3)) for _ in range(ndim)),
    )

    if transposed and data.draw(st.integers(0, 5)) > 0:
        kwargs["padding_mode"] = "zeros"  # the only mode torch has for transposed convs
        kwargs["padding"] = per_dim(data, ndim, 0, 2, -1)
    try:
        layer = CONV[ndim, transposed](cin, cout, **kwargs).double()
    except Exception as exc:
        event(f"torch: {str(exc)[:40]}")
        # torch refuses the hyperparameters: the raw-kernel API must refuse them too, unless the
        # refusal is about channel counts, which a raw kernel's shape cannot express
        if cin % groups or cout % groups:
            with pytest.raises(ConvtoolError, match="divisible by groups"):
                ConvSpec.create(ndim, cin, cout, 1, groups=groups)
            return
        kernel = kwargs["kernel_size"]
        ks = (kernel,) * ndim if isinstance(kernel, int) else kernel
        wshape = (
            (cin, max(cout // groups, 1), *ks) if transposed else (cout, max(cin // groups, 1), *ks)
        )
        extra = {k: v for k, v in kwargs.items() if k not in ("kernel_size", "bias")}
        try:
            weight = torch.zeros(tuple(max(s, 0) for s in wshape))
        except Exception:
            return
        try:
            toeplitz_from_weight(weight, shape, transposed=transposed, **extra)
        except ConvtoolError:
            event("torch refused the hyperparameters; so did convtool")
            return
        raise AssertionError(
            f"torch refused {kwargs} but convtool accepted weight {wshape}"
        ) from None

    try:
        x = torch.randn(1, *shape, dtype=torch.float64)
        expected = layer(x)
        torch_ok = expected.numel() > 0
    except Exception as exc:
        event(f"torch input: {str(exc)[:40]}")
        torch_ok = False
    if not torch_ok:
        try:
            toeplitz(layer, shape)
        except ConvtoolError:
            event("torch refused the input; so did convtool")
            return
        raise AssertionError(f"torch refused input {shape} for {layer} but convtool accepted it")

    padding = kwargs["padding"]
    pads = (padding,) if isinstance(padding, int) else padding
    if kwargs["padding_mode"] != "zeros" and any(isinstance(p, int) and p < 0 for p in pads):
        # torch crops the input by a negative padding in non-zero modes (F.pad); convtool
        # refuses that layer, saying so
        with pytest.raises(ConvtoolError, match="torch crops the input by a negative padding"):
            toeplitz(layer, shape)
        event("negative padding in a non-zero mode (torch crops): refused")
        return
    event("valid: compared with torch")
    t = toeplitz(layer, shape)
    b = bias_vector(layer, shape)
    assert t.shape == (expected.numel(), math.prod(shape))
    torch.testing.assert_close(
        t @ x.flatten() + b, expected.detach().flatten(), rtol=1e-10, atol=1e-10
    )
    jac = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, *shape)).flatten(), x.flatten()
    )
    torch.testing.assert_close(t, jac, rtol=0, atol=1e-12)
    ts = toeplitz(layer, shape, sparse=True)
    torch.testing.assert_close(ts.to_dense(), t, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_negative_padding_that_torch_reads_as_a_crop_is_refused(mode: str) -> None:
    # Found by the fuzz test above: torch runs this layer (F.pad crops by -1); convtool refuses.
    layer = torch.nn.Conv1d(1, 1, 1, padding=-1, padding_mode=mode)
    assert layer(torch.randn(1, 1, 3)).shape == (1, 1, 1)
    with pytest.raises(ConvtoolError, match="torch crops the input by a negative padding"):
        toeplitz(layer, (1, 3))
