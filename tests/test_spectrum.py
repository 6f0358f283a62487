"""Matrix-free operator and singular values, against the autograd Jacobian of the layer itself.

The oracle is PyTorch: `torch.autograd.functional.jacobian` of the module (float64) is `T`, and
`torch.linalg.svdvals` of it gives the singular values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import convtool
from convtool.errors import ConvtoolError
from convtool.operators import gram_norm_bound, padding_norm

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

Factory = Callable[[], nn.Module]

# (id, layer factory, one-sample input shape): every conv kind, padding mode and flag.
CASES: list[tuple[str, Factory, tuple[int, ...]]] = [
    ("c1d", lambda: nn.Conv1d(2, 3, 3), (2, 9)),
    ("c1d-stride-pad", lambda: nn.Conv1d(3, 2, 4, stride=2, padding=2), (3, 11)),
    ("c1d-reflect", lambda: nn.Conv1d(2, 2, 3, padding=2, padding_mode="reflect"), (2, 7)),
    (
        "c1d-circular-same",
        lambda: nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"),
        (2, 8),
    ),
    ("c2d-zeros", lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 6)),
    ("c2d-same-even", lambda: nn.Conv2d(2, 2, (2, 4), padding="same"), (2, 5, 6)),
    (
        "c2d-stride-dil",
        lambda: nn.Conv2d(2, 4, 3, stride=(2, 1), dilation=(1, 2), padding=2),
        (2, 7, 8),
    ),
    ("c2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 5, 5)),
    ("c2d-reflect", lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="reflect"), (2, 5, 6)),
    (
        "c2d-replicate",
        lambda: nn.Conv2d(2, 2, 3, padding=2, stride=2, padding_mode="replicate"),
        (2, 6, 5),
    ),
    ("c2d-circular", lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"), (3, 5, 4)),
    (
        "c2d-circular-dil",
        lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="circular"),
        (2, 6, 5),
    ),
    (
        "c2d-circular-stride",
        lambda: nn.Conv2d(2, 2, 3, padding=1, stride=2, padding_mode="circular"),
        (2, 6, 6),
    ),
    (
        "c2d-circular-groups",
        lambda: nn.Conv2d(4, 2, 3, padding=1, groups=2, padding_mode="circular"),
        (4, 4, 5),
    ),
    ("c3d", lambda: nn.Conv3d(2, 2, 2, padding=1), (2, 3, 3, 4)),
    ("c3d-circular", lambda: nn.Conv3d(1, 2, 3, padding=1, padding_mode="circular"), (1, 3, 4, 3)),
    (
        "c3d-replicate",
        lambda: nn.Conv3d(2, 1, (1, 2, 3), padding=(0, 1, 1), padding_mode="replicate"),
        (2, 2, 3, 4),
    ),
    ("t1d", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 5)),
    ("t2d", lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1), (3, 4, 3)),
    (
        "t2d-dil-outpad",
        lambda: nn.ConvTranspose2d(2, 2, 2, stride=1, dilation=3, output_padding=2),
        (2, 3, 4),
    ),
    (
        "t2d-groups",
        lambda: nn.ConvTranspose2d(4, 2, 3, stride=(1, 2), groups=2, padding=(1, 0)),
        (4, 3, 4),
    ),
    ("t3d", lambda: nn.ConvTranspose3d(2, 1, 2, stride=2), (2, 2, 2, 3)),
]
IDS = [c[0] for c in CASES]


def _make(factory: Factory) -> nn.Module:
    torch.manual_seed(0)
    return factory().double()


def jacobian(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """`T` by autograd: d layer(x).flatten() / d x.flatten(), float64."""
    x = torch.zeros(math.prod(shape), dtype=torch.float64)

    def f(v: torch.Tensor) -> torch.Tensor:
        return layer(v.view(1, *shape)).reshape(-1)

    return torch.autograd.functional.jacobian(f, x)


def svdvals(layer: nn.Module, shape: tuple[int, ...]) -> np.ndarray:
    return torch.linalg.svdvals(jacobian(layer, shape)).numpy()


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=IDS)
def test_operator_is_t_and_its_transpose(
    name: str, factory: Factory, shape: tuple[int, ...]
) -> None:
    layer = _make(factory)
    j = jacobian(layer, shape).numpy()
    op = convtool.linear_operator(layer, shape)
    assert op.shape == j.shape and op.dtype == np.float64
    eye_n, eye_m = np.eye(j.shape[1]), np.eye(j.shape[0])
    np.testing.assert_allclose(op.matmat(eye_n), j, rtol=0, atol=1e-13)
    np.testing.assert_allclose(op.rmatmat(eye_m), j.T, rtol=0, atol=1e-13)
    x = np.random.default_rng(1).standard_normal(j.shape[1])
    np.testing.assert_allclose(op.matvec(x), j @ x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(op.H.matvec(j @ x), j.T @ (j @ x), rtol=0, atol=1e-11)


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=IDS)
def test_dot_product(name: str, factory: Factory, shape: tuple[int, ...]) -> None:
    """<A x, y> == <x, A^T y> to rounding, for random x and y."""
    op = convtool.linear_operator(_make(factory), shape)
    rng = np.random.default_rng(2)
    for _ in range(3):
        x, y = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
        lhs, rhs = op.matvec(x) @ y, x @ op.rmatvec(y)
        scale = np.linalg.norm(op.matvec(x)) * np.linalg.norm(y)
        assert abs(lhs - rhs) <= 1e-14 * scale * 10


def test_operator_accepts_a_batch_shape_and_float32_layer() -> None:
    layer = nn.Conv2d(2, 3, 3, padding=1)  # float32 weights: the operator is float64
    op = convtool.linear_operator(layer, (1, 2, 4, 4))
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(x, layer.weight.detach().double(), padding=1).reshape(-1)
    np.testing.assert_allclose(op.matvec(x.reshape(-1).numpy()), ref.numpy(), atol=1e-13)


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=IDS)
def test_spectrum_auto_matches_svdvals(name: str, factory: Factory, shape: tuple[int, ...]) -> None:
    layer = _make(factory)
    ref = svdvals(layer, shape)
    for which in ("largest", "smallest"):
        s = convtool.spectrum(layer, shape, k=4, which=which)
        assert s.method in ("fft", "dense")
        want = ref[:4] if which == "largest" else ref[-4:]
        np.testing.assert_allclose(s.values, want, rtol=0, atol=1e-9 * ref[0])
        assert np.all(np.diff(s.values) <= 0)
        assert s.tolerance < 1e-9 * ref[0]
    assert s.sigma_max == pytest.approx(ref[0], rel=1e-12)
    assert s.sigma_min == pytest.approx(ref[-1], abs=1e-12 * ref[0])


LANCZOS = ["c1d-stride-pad", "c2d-zeros", "c2d-reflect", "c2d-groups", "c3d", "t2d-groups"]


@pytest.mark.parametrize(("name", "factory", "shape"), [c for c in CASES if c[0] in LANCZOS])
def test_spectrum_svds_matches_svdvals(name: str, factory: Factory, shape: tuple[int, ...]) -> None:
    layer = _make(factory)
    ref = svdvals(layer, shape)
    k = 2
    s = convtool.spectrum(layer, shape, k=k, method="svds", tol=1e-12)
    assert s.method == "svds" and s.exact and s.residuals is not None
    np.testing.assert_allclose(s.values, ref[:k], rtol=1e-9)
    assert s.tolerance < 1e-5 * ref[0]
    if name in ("c2d-zeros", "t2d-groups"):
        low = convtool.spectrum(layer, shape, k=k, which="smallest", method="svds", tol=1e-13)
        # through the Gram matrix, values near 0 resolve to ~sqrt(eps) * sigma_max
        np.testing.assert_allclose(low.values, ref[-k:], rtol=0, atol=1e-7 * ref[0])
        assert low.residuals is not None
        for value, r in zip(low.values, low.residuals, strict=True):  # a singular value within r
            assert np.min(np.abs(ref - value)) <= r + 1e-15


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="circular", groups=2),
        lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="circular"),
        lambda: nn.Conv1d(2, 2, 5, padding=2, padding_mode="circular"),
        lambda: nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular"),
    ],
)
def test_fft_matches_matrix_free_and_jacobian(factory: Factory) -> None:
    layer = _make(factory)
    shape = (layer.in_channels, *([6] * (len(layer.kernel_size) - 1)), 7)
    s = convtool.spectrum(layer, shape, k=3)
    assert s.method == "fft" and s.all_values is not None
    np.testing.assert_allclose(s.all_values, svdvals(layer, shape), rtol=0, atol=1e-12)
    lz = convtool.spectrum(layer, shape, k=3, method="svds", tol=1e-12)
    np.testing.assert_allclose(s.values, lz.values, rtol=1e-9)


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=IDS)
def test_bound_is_an_upper_bound(name: str, factory: Factory, shape: tuple[int, ...]) -> None:
    layer = _make(factory)
    top = svdvals(layer, shape)[0]
    s = convtool.spectrum(layer, shape, method="bound")
    assert not s.exact and s.upper_bound is not None and s.lower_bound is not None
    assert s.lower_bound <= top * (1 + 1e-12)
    assert s.upper_bound >= top * (1 - 1e-12)
    assert s.norm_bound == s.upper_bound
    assert s.tolerance == pytest.approx(s.upper_bound - s.lower_bound)


def test_bound_is_tight_for_circular_and_big_zero_padded() -> None:
    torch.manual_seed(3)
    circ = nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular").double()
    exact = convtool.spectrum(circ, (3, 8, 8), k=1).values[0]
    bound = convtool.spectrum(circ, (3, 6, 6), method="bound").upper_bound
    assert bound is not None and bound >= exact * (1 - 1e-12)  # a sup over a coarser grid
    zero = nn.Conv2d(3, 3, 3, padding=1).double()
    b = convtool.spectrum(zero, (3, 24, 24), method="bound")
    assert b.upper_bound is not None and b.lower_bound is not None
    assert b.upper_bound / b.lower_bound < 1.05


def test_gram_iteration_bounds_each_matrix() -> None:
    mats = torch.randn(50, 5, 4, dtype=torch.complex128)
    exact = torch.linalg.matrix_norm(mats, ord=2)
    for t in (0, 2, 8):
        bound = gram_norm_bound(mats, t)
        assert bool((bound >= exact * (1 - 1e-12)).all())
    assert torch.allclose(gram_norm_bound(mats, 12), exact, rtol=1e-6)


def test_padding_norm_against_the_padding_matrix() -> None:
    for mode in ("reflect", "replicate", "circular"):
        conv = nn.Conv2d(1, 1, 3, padding=2, padding_mode=mode, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0, 0, 0] = 1.0  # the conv then reads the padded input at one tap
        spec = convtool.ConvSpec.from_module(conv)
        eye = torch.eye(20, dtype=torch.float64).view(20, 1, 4, 5)
        pad = torch.nn.functional.pad(eye, (2, 2, 2, 2), mode=mode).reshape(20, -1)
        assert padding_norm(spec, (1, 4, 5)) == pytest.approx(
            float(torch.linalg.matrix_norm(pad, ord=2))
        )


def test_svds_default_tolerance() -> None:
    """Lanczos at the default tolerance, against torch's conv applied to the identity."""
    torch.manual_seed(4)
    layer = nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
    shape = (4, 14, 14)  # a clustered top: the hard case for Lanczos
    s = convtool.spectrum(layer, shape, k=1, method="svds")  # tol=1e-6 relative by default
    eye = torch.eye(784, dtype=torch.float64).view(784, *shape)
    t = torch.nn.functional.conv2d(eye, layer.weight, padding=1).reshape(784, -1).T
    ref = torch.linalg.matrix_norm(t, ord=2).item()
    assert s.values[0] == pytest.approx(ref, rel=1e-6)
    assert abs(s.values[0] - ref) <= s.tolerance
    tight = convtool.spectrum(layer, shape, k=1, tol=1e-14)
    assert tight.values[0] == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be a positive int"),
        ({"which": "middle"}, "which must be"),
        ({"method": "magic"}, "method must be one of"),
        ({"method": "fft"}, "method='fft' needs circular padding"),
        ({"method": "bound", "which": "smallest"}, "bounds sigma_max only"),
        ({"tol": 0.0}, "tol must be in"),
        ({"method": "svds", "k": 200}, "too large for Lanczos"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    layer = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.raises(ConvtoolError, match=message):
        convtool.spectrum(layer, (2, 5, 5), **kwargs)  # type: ignore[arg-type]


def test_bad_layer_input() -> None:
    with pytest.raises(ConvtoolError, match="input channels"):
        convtool.linear_operator(nn.Conv2d(2, 2, 3), (3, 5, 5))
    layer = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    with pytest.raises(ConvtoolError, match="NaN"):
        convtool.spectrum(layer, (1, 3, 3))
