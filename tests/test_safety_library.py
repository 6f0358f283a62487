"""The Python API on absurd sizes and odd arguments: it works, or raises ConvtoolError with one
clear message that speaks in parameters, never AttributeError/RuntimeError/MemoryError from
deep inside, and never after allocating what it refuses.

Refusals of absurd sizes are checked in a child process with a 2 GiB address-space cap: a
function that tried to allocate first would die there with a foreign error instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convtool
from convtool import ConvtoolError
from tests.safety_helpers import REPO

HUGE = (3, 99999, 99999)  # dense T: 4.1 ZiB, sparse: 49 TiB, LC: 4.1 TiB, bias: 149 GiB


CALLS = {
    "toeplitz": "convtool.toeplitz(c, HUGE)",
    "toeplitz sparse": "convtool.toeplitz(c, HUGE, sparse=True)",
    "toeplitz csr": "convtool.toeplitz(c, HUGE, sparse=True, layout='csr')",
    "toeplitz_from_weight": "convtool.toeplitz_from_weight(c.weight, HUGE)",
    "bias_vector": "convtool.bias_vector(c, HUGE)",
    "to_locally_connected": "convtool.to_locally_connected(c, HUGE)",
    "to_fully_connected": "convtool.to_fully_connected(c, HUGE)",
    "to_fully_connected sparse": "convtool.to_fully_connected(c, HUGE, sparse=True)",
    "verify": "convtool.verify(c, HUGE)",
    "convert_model": "convtool.convert_model(nn.Sequential(c), (1, *HUGE))",
    "padding 99999999": "convtool.toeplitz(nn.Conv2d(3, 4, 3, padding=99999999), (3, 8, 8))",
    "padding 99999999 lc": "convtool.to_locally_connected(nn.Conv2d(3, 4, 3, padding=99999999), "
    "(3, 8, 8))",
    "padding 99999999 verify": "convtool.verify(nn.Conv2d(3, 4, 3, padding=99999999), (3, 8, 8))",
    "padding 99999999 convert": "convtool.convert_model(nn.Conv2d(3, 4, 3, padding=99999999), "
    "(1, 3, 8, 8))",
    "stride 1e20": "convtool.toeplitz(nn.Conv2d(3, 4, 3, stride=10**20), (3, 8, 8))",
}


CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
import torch, convtool
from torch import nn
c = nn.Conv2d(3, 4, 3)
outcomes = {}
for name, call in json.loads(sys.argv[1]).items():
    try:
        eval(call)
        outcomes[name] = "no error"
    except convtool.ConvtoolError as exc:
        outcomes[name] = "ConvtoolError: " + str(exc)
    except BaseException as exc:
        outcomes[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    """Every call of CALLS in one child process capped at 2 GiB of address space: a function
    that tried to allocate before checking would die there with a foreign error."""
    calls = {name: call.replace("HUGE", repr(HUGE)) for name, call in CALLS.items()}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(calls)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout))


@pytest.mark.parametrize("name", list(CALLS))
def test_absurd_sizes_are_refused_before_allocating(outcomes: dict[str, str], name: str) -> None:
    message = outcomes[name]
    assert message.startswith("ConvtoolError: "), message
    assert "needs" in message or "2**63 - 1" in message, message
    assert "--" not in message  # parameters, not CLI flags


def test_absurd_sizes_refused_in_process_too() -> None:
    c = nn.Conv2d(3, 4, 3)
    with pytest.raises(ConvtoolError, match=r"4\.1 ZiB.*sparse=True"):
        convtool.toeplitz(c, HUGE)
    with pytest.raises(ConvtoolError, match="stride is 100000000000000000000"):
        convtool.count_params(nn.Conv2d(3, 4, 3, stride=10**20), (3, 8, 8))


def test_count_params_is_analytic_at_any_size() -> None:
    """O(dims) whatever the size; the counts match the closed forms (cross-checked against an
    index-padding oracle in test_sizes.py)."""
    report = convtool.count_params(nn.Conv2d(3, 4, 3, bias=False), (3, 99999999, 99999999))
    layer = report.layers[0]
    out = 99999997
    assert layer.output_shape == (4, out, out)
    assert layer.fc_params == (4 * out * out) * (3 * 99999999**2)
    assert layer.fc_nonzero == 4 * 3 * (out * 3) ** 2  # no tap reads padding
    padded = convtool.count_params(nn.Conv2d(3, 4, 3, padding=99999999), (3, 8, 8)).layers[0]
    assert padded.output_shape == (4, 200000004, 200000004)
    assert padded.fc_nonzero == 4 * 3 * 24**2 + 4 * 200000004**2  # 8 x 3 taps per axis + bias


@pytest.mark.parametrize(
    "function",
    [
        convtool.toeplitz,
        convtool.bias_vector,
        convtool.to_locally_connected,
        convtool.to_fully_connected,
        convtool.verify,
        convtool.count_params,
    ],
)
@pytest.mark.parametrize("shape", [(3, 8.5, 8), (3, 8.0, 8), (3, "8", 8), (3, True, 8), "3,8,8", 8])
def test_non_integer_shapes_are_refused(function: Callable[..., Any], shape: Any) -> None:
    with pytest.raises(ConvtoolError, match="input shape must"):
        function(nn.Conv2d(3, 4, 3), shape)


def test_integer_like_shapes_work() -> None:
    conv = nn.Conv2d(3, 4, 3)
    for shape in [(3, np.int64(8), 8), torch.Size([3, 8, 8]), np.array([3, 8, 8])]:
        assert convtool.toeplitz(conv, shape).shape == (4 * 36, 3 * 64)


def test_non_integer_example_shape_for_a_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    for call in (convtool.count_params, convtool.convert_model):
        with pytest.raises(ConvtoolError, match="example input shape must hold ints"):
            call(model, (1, 3, 8.5, 8))


def test_toeplitz_from_weight_accepts_numpy() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    t = convtool.toeplitz_from_weight(w, (3, 8, 8), padding=1)
    x = torch.randn(3, 8, 8)
    expected = F.conv2d(x[None], torch.from_numpy(w), padding=1).flatten()
    torch.testing.assert_close(t @ x.flatten(), expected)
    be = convtool.toeplitz_from_weight(w.astype(">f4"), (3, 8, 8), padding=1)  # big-endian
    assert torch.equal(be, t)
    with pytest.raises(ConvtoolError, match="torch tensor or a numpy array"):
        convtool.toeplitz_from_weight([[1.0]], (3, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(ConvtoolError, match="real numeric"):
        convtool.toeplitz_from_weight(np.array([["a"]]), (3, 8, 8))  # type: ignore[arg-type]


@pytest.mark.parametrize("model", [None, "model", 3, torch.ones(2)])
def test_convert_model_refuses_non_modules(model: Any) -> None:
    with pytest.raises(ConvtoolError, match=r"model must be an nn\.Module"):
        convtool.convert_model(model, (1, 3, 8, 8))


def test_meta_device_layers() -> None:
    conv = nn.Conv2d(3, 4, 3, device="meta")
    for call in (convtool.toeplitz, convtool.verify, convtool.to_locally_connected,
                 convtool.to_fully_connected, convtool.bias_vector):  # fmt: skip
        with pytest.raises(ConvtoolError, match="meta device"):
            call(conv, (3, 8, 8))
    # counting needs no values: it works on the meta device
    assert convtool.count_params(conv, (3, 8, 8)).layers[0].fc_nonzero == 4 * 27 * 36 + 4 * 36


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_are_refused_where_computed(dtype: torch.dtype) -> None:
    conv = nn.Conv2d(3, 4, 3).to(dtype)
    for call in (convtool.toeplitz, convtool.to_locally_connected, convtool.to_fully_connected,
                 convtool.bias_vector):  # fmt: skip
        with pytest.raises(ConvtoolError, match="cast it to float32"):
            call(conv, (3, 8, 8))
    with pytest.raises(ConvtoolError, match="cast it to float32"):
        convtool.convert_model(nn.Sequential(conv), (1, 3, 8, 8))
    # counting needs no arithmetic; verify computes in its own dtype (float64), exactly
    assert convtool.count_params(conv, (3, 8, 8)).layers[0].itemsize == 1
    assert convtool.verify(conv, (3, 8, 8), trials=1)


def _int_conv() -> nn.Conv2d:
    conv = nn.Conv2d(3, 4, 3)
    conv.weight = nn.Parameter(torch.arange(108).reshape(4, 3, 3, 3) % 7 - 3, requires_grad=False)
    conv.bias = nn.Parameter(torch.arange(4) - 2, requires_grad=False)
    return conv


def test_int_weights_are_computed_in_float64_like_the_cli() -> None:
    conv = _int_conv()
    w, b = conv.weight.double(), conv.bias.double()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    expected = F.conv2d(x[None], w, b).flatten()
    t = convtool.toeplitz(conv, (3, 8, 8))
    assert t.dtype == torch.float64
    torch.testing.assert_close(t @ x.flatten() + convtool.bias_vector(conv, (3, 8, 8)), expected)
    t2 = convtool.toeplitz_from_weight(conv.weight.int(), (3, 8, 8))
    assert torch.equal(t2, t)
    lc = convtool.to_locally_connected(conv, (3, 8, 8))
    torch.testing.assert_close(lc(x[None]).flatten(), expected)
    fc = convtool.to_fully_connected(conv, (3, 8, 8), sparse=True)
    torch.testing.assert_close(fc(x[None]).flatten(), expected)
    assert convtool.verify(conv, (3, 8, 8), trials=1)


def test_nonfinite_weights_in_the_library() -> None:
    """The library builds the exact forms of a NaN kernel (T holds the NaN where the kernel
    does); verify reports the mismatch. Refusing NaN is the CLI's job (--allow-nonfinite)."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    t = convtool.toeplitz(conv, (3, 8, 8))
    assert int(t.isnan().sum()) == 36  # one NaN per output position of channel 0
    report = convtool.verify(conv, (3, 8, 8), trials=1)
    assert not report and report.failures


def test_no_foreign_exception_from_odd_layers() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in (convtool.toeplitz, convtool.to_locally_connected, convtool.verify):
            for layer in (None, nn.Linear(3, 4), "conv"):
                with pytest.raises(ConvtoolError):
                    call(layer, (3, 8, 8))
