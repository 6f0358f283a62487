"""ConvSpec: one convolution layer's hyperparameters, normalised and validated.

Names follow PyTorch (`in_channels`, `kernel_size`, `padding_mode`, ...). A spec knows shapes
only; weights live elsewhere. Everything that can be wrong about a layer/input combination is
caught here and raised as :class:`~convtool.errors.ConvtoolError` with PyTorch's wording where it
has one.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from convtool.errors import ConvtoolError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# PyTorch holds every size, stride and element count in an int64: anything larger can never be
# allocated or even described to it, so it is refused here, before any arithmetic on tensors.
INT64_MAX = 2**63 - 1


def _check_int64(value: int, what: str) -> None:
    if value > INT64_MAX:
        raise ConvtoolError(
            f"{what} is {value}, more than the largest size PyTorch can hold (2**63 - 1)"
        )


def as_shape(value: Any, what: str = "input shape") -> tuple[int, ...]:
    """A shape as a tuple of Python ints, refusing floats, bools, strings and int64 overflow.

    Accepts ints and anything with `__index__` (numpy integers, `torch.Size`, int tensors of
    one element); `(3, 8.5, 8)` or `(3, "8", 8)` are refused rather than truncated.
    """
    try:
        if isinstance(value, (str, bytes, dict)):
            raise TypeError
        given = list(value)
    except TypeError:
        raise ConvtoolError(f"{what} must be a sequence of ints, got {value!r}") from None
    items = []
    for item in given:
        try:
            if isinstance(item, bool):
                raise TypeError
            number = operator.index(item)
        except TypeError:
            raise ConvtoolError(f"{what} must hold ints, got {_repr(value)}") from None
        _check_int64(number, f"a size in {what} {_repr(value)}")
        items.append(number)
    return tuple(items)


def _repr(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor {value.tolist()!r}" if value.numel() <= 8 else "a tensor"
    text = repr(tuple(value))
    return text if len(text) <= 80 else text[:77] + "..."


CONV_TYPES: dict[type[nn.Module], tuple[int, bool]] = {
    nn.Conv1d: (1, False),
    nn.Conv2d: (2, False),
    nn.Conv3d: (3, False),
    nn.ConvTranspose1d: (1, True),
    nn.ConvTranspose2d: (2, True),
    nn.ConvTranspose3d: (3, True),
}


def conv_class(ndim: int, transposed: bool) -> type[nn.Module]:
    """`nn.Conv{ndim}d`, or `nn.ConvTranspose{ndim}d` when `transposed`."""
    return next(t for t, key in CONV_TYPES.items() if key == (ndim, transposed))


def is_conv(module: object) -> bool:
    """True for the six PyTorch conv module types (and their subclasses)."""
    return isinstance(module, tuple(CONV_TYPES))


def _tuple(
    value: Any, ndim: int, name: str, *, minimum: int, broadcast: bool = True
) -> tuple[int, ...]:
    """Broadcast an int to `ndim` ints, check a sequence's length and every element's value."""
    if isinstance(value, bool):
        raise ConvtoolError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    if isinstance(value, int):
        items: tuple[Any, ...] = (value,) * ndim
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) == 1 and ndim > 1 and broadcast:
            items = items * ndim
        if len(items) != ndim:
            raise ConvtoolError(
                f"{name} must have {ndim} element(s) for a {ndim}-d conv, got {tuple(value)!r}"
            )
    else:
        raise ConvtoolError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ConvtoolError(f"{name} must contain ints, got {value!r}")
        if item < minimum:
            bound = "positive" if minimum == 1 else "non-negative"
            raise ConvtoolError(f"{name} must be {bound}, got {value!r}")
        _check_int64(item, name)
    return items


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


@dataclass(frozen=True)
class ConvSpec:
    """Hyperparameters of one `nn.Conv{1,2,3}d` or `nn.ConvTranspose{1,2,3}d`.

    Build one with :meth:`create` (normalises ints to tuples and validates), :meth:`from_module`
    or :meth:`from_weight`; the raw constructor expects already-normalised tuples.

    Attributes:
        ndim: number of spatial dimensions (1, 2 or 3).
        in_channels: channels of the input `x`, shape `(N, in_channels, *spatial)`.
        out_channels: channels of the output.
        kernel_size: kernel extent per spatial dim.
        stride, dilation, output_padding: per spatial dim.
        padding: per-dim ints, or the strings 'same' / 'valid' as PyTorch accepts them.
        groups: channel groups.
        padding_mode: 'zeros', 'reflect', 'replicate' or 'circular'.
        transposed: True for ConvTranspose layers.
        bias: whether the layer has a bias.
    """

    ndim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    bias: bool = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        transposed: bool = False,
        output_padding: int | Sequence[int] = 0,
        bias: bool = True,
    ) -> ConvSpec:
        """Normalise PyTorch-style arguments and validate them (not the input shape)."""
        if ndim not in (1, 2, 3):
            raise ConvtoolError(f"only 1-d, 2-d and 3-d convolutions exist, got ndim={ndim!r}")
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConvtoolError(f"{name} must be a positive int, got {value!r}")
            _check_int64(value, name)
        kernel = _tuple(kernel_size, ndim, "kernel_size", minimum=1)
        strides = _tuple(stride, ndim, "stride", minimum=1)
        dilations = _tuple(dilation, ndim, "dilation", minimum=1)
        out_pad = _tuple(output_padding, ndim, "output_padding", minimum=0)
        pad: tuple[int, ...] | str
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ConvtoolError(
                    f"Invalid padding string {padding!r}, should be one of {{'valid', 'same'}}"
                )
            pad = padding
        else:
            pad = _tuple(padding, ndim, "padding", minimum=0)
        if padding_mode not in PADDING_MODES:
            raise ConvtoolError(
                f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}"
            )
        if in_channels % groups:
            raise ConvtoolError(
                f"in_channels must be divisible by groups (in_channels={in_channels}, "
                f"groups={groups})"
            )
        if out_channels % groups:
            raise ConvtoolError(
                f"out_channels must be divisible by groups (out_channels={out_channels}, "
                f"groups={groups})"
            )
        if pad == "same" and any(s != 1 for s in strides):
            raise ConvtoolError(
                f"padding='same' is not supported for strided convolutions (stride={strides})"
            )
        if transposed:
            if isinstance(pad, str):
                raise ConvtoolError(
                    f"padding={pad!r} is not supported for transposed convolutions; give ints"
                )
            if padding_mode != "zeros":
                raise ConvtoolError(
                    f"Only 'zeros' padding mode is supported for transposed convolutions, "
                    f"got {padding_mode!r}"
                )
            for op, s, d in zip(out_pad, strides, dilations, strict=True):
                if op >= max(s, d):
                    raise ConvtoolError(
                        f"output padding must be smaller than either stride or dilation, got "
                        f"output_padding={out_pad}, stride={strides}, dilation={dilations}"
                    )
        elif any(out_pad):
            raise ConvtoolError("output_padding applies to transposed convolutions only")
        return cls(
            ndim=ndim,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel,
            stride=strides,
            padding=pad,
            dilation=dilations,
            groups=groups,
            padding_mode=padding_mode,
            transposed=bool(transposed),
            output_padding=out_pad,
            bias=bool(bias),
        )

    @classmethod
    def from_module(cls, module: nn.Module) -> ConvSpec:
        """Read the spec of an `nn.Conv*d` / `nn.ConvTranspose*d` module."""
        kind = next((v for t, v in CONV_TYPES.items() if isinstance(module, t)), None)
        if kind is None:
            raise ConvtoolError(
                f"expected an nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d, got "
                f"{type(module).__name__}"
            )
        ndim, transposed = kind
        m: Any = module
        padding = m.padding
        if m.padding_mode != "zeros" and not isinstance(padding, str):
            # nn.Conv pads non-zero modes itself with F.pad, which does not broadcast a 1-tuple
            # and reads one extra leading entry as padding of the channel dim (0 is harmless).
            padding = tuple(padding)
            if len(padding) == ndim + 1 and padding[0] == 0:
                padding = padding[1:]
            if any(isinstance(p, int) and not isinstance(p, bool) and p < 0 for p in padding):
                # F.pad reads a negative width as a crop, so torch runs such a layer
                raise ConvtoolError(
                    f"padding must be non-negative, got {tuple(m.padding)!r}: with "
                    f"padding_mode={m.padding_mode!r} torch crops the input by a negative "
                    f"padding, which convtool does not support (crop the input instead)"
                )
            _tuple(padding, ndim, "padding", minimum=0, broadcast=False)
        return cls.create(
            ndim=ndim,
            in_channels=m.in_channels,
            out_channels=m.out_channels,
            kernel_size=m.kernel_size,
            stride=m.stride,
            padding=padding,
            dilation=m.dilation,
            groups=m.groups,
            padding_mode=m.padding_mode,
            transposed=transposed,
            output_padding=m.output_padding if transposed else 0,
            bias=m.bias is not None,
        )

    @classmethod
    def from_weight(
        cls,
        weight_shape: Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        transposed: bool = False,
        output_padding: int | Sequence[int] = 0,
        bias: bool = False,
    ) -> ConvSpec:
        """Spec of a conv with a raw kernel of `weight_shape` plus PyTorch's flags.

        `weight_shape` is `(C_out, C_in / groups, *kernel)` for a conv and
        `(C_in, C_out / groups, *kernel)` for a transposed conv, as in PyTorch.
        """
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) not in (3, 4, 5):
            raise ConvtoolError(
                f"a conv kernel has 3, 4 or 5 dims (C_out, C_in/groups, *kernel), got shape "
                f"{_shape_str(shape)}"
            )
        if any(s <= 0 for s in shape):
            raise ConvtoolError(f"kernel shape must be positive, got {_shape_str(shape)}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ConvtoolError(f"groups must be a positive int, got {groups!r}")
        _check_int64(groups, "groups")
        if transposed:
            in_channels, out_channels = shape[0], shape[1] * groups
        else:
            in_channels, out_channels = shape[1] * groups, shape[0]
        return cls.create(
            ndim=len(shape) - 2,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=shape[2:],
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            transposed=transposed,
            output_padding=output_padding,
            bias=bias,
        )

    # ------------------------------------------------------------------ derived
    @property
    def kind(self) -> str:
        """PyTorch class name, e.g. 'Conv2d' or 'ConvTranspose1d'."""
        return f"{'ConvTranspose' if self.transposed else 'Conv'}{self.ndim}d"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the layer's weight, as PyTorch stores it."""
        if self.transposed:
            return (self.in_channels, self.out_channels // self.groups, *self.kernel_size)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        """Taps per kernel: prod(kernel_size)."""
        return math.prod(self.kernel_size)

    @property
    def pad_pairs(self) -> tuple[tuple[int, int], ...]:
        """(before, after) padding per spatial dim, resolving 'same' like PyTorch."""
        if self.padding == "valid":
            return ((0, 0),) * self.ndim
        if self.padding == "same":
            pairs = []
            for k, d in zip(self.kernel_size, self.dilation, strict=True):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        assert not isinstance(self.padding, str)
        return tuple((p, p) for p in self.padding)

    def sample_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Normalise an input shape to one sample `(C_in, *spatial)` and validate it.

        Accepts `(C_in, *spatial)` or a batched `(N, C_in, *spatial)` (the batch is dropped).
        """
        shape = as_shape(input_shape)
        if len(shape) == self.ndim + 2:
            if shape[0] <= 0:
                raise ConvtoolError(f"batch size must be positive, got {_shape_str(shape)}")
            shape = shape[1:]
        if len(shape) != self.ndim + 1:
            raise ConvtoolError(
                f"a {self.kind} expects an input shape (C_in, {self._spatial_names()}) with "
                f"{self.ndim + 1} numbers, got {_shape_str(shape)}"
            )
        if shape[0] != self.in_channels:
            why = ""
            if self.groups > 1:
                per_group = self.in_channels // self.groups
                why = f" ({per_group} per group x groups={self.groups})"
            raise ConvtoolError(
                f"{self.kind} expects {self.in_channels} input channels{why} but the input shape "
                f"{_shape_str(shape)} has {shape[0]}"
            )
        if any(s <= 0 for s in shape[1:]):
            raise ConvtoolError(f"spatial sizes must be positive, got {_shape_str(shape)}")
        _check_int64(math.prod(shape), f"the element count of one input sample {_shape_str(shape)}")
        return shape

    def checked_sample(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """:meth:`sample_shape`, also checking the layer can run on it (kernel fits, padding)."""
        sample = self.sample_shape(input_shape)
        self.output_shape(sample)
        return sample

    def _spatial_names(self) -> str:
        return ", ".join(("D", "H", "W")[3 - self.ndim :])

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """`(C_out, *out_spatial)` for one sample of `input_shape`; raises if the input is unfit."""
        shape = self.sample_shape(input_shape)
        spatial = shape[1:]
        out: list[int] = []
        if self.transposed:
            for n, k, s, d, (p, _), op in zip(
                spatial,
                self.kernel_size,
                self.stride,
                self.dilation,
                self.pad_pairs,
                self.output_padding,
                strict=True,
            ):
                size = (n - 1) * s - 2 * p + d * (k - 1) + op + 1
                if size <= 0:
                    raise ConvtoolError(
                        f"{self.kind} on input {_shape_str(shape)} would give a non-positive "
                        f"output size {size}; reduce padding={self.padding}"
                    )
                out.append(size)
            return self._checked_output(shape, out)
        for n, k, s, d, (lo, hi) in zip(
            spatial, self.kernel_size, self.stride, self.dilation, self.pad_pairs, strict=True
        ):
            if self.padding_mode == "reflect" and max(lo, hi) >= n:
                raise ConvtoolError(
                    f"reflect padding {max(lo, hi)} must be less than the input size {n} "
                    f"(input {_shape_str(shape)}); use a smaller padding or 'replicate'"
                )
            if self.padding_mode == "circular" and max(lo, hi) > n:
                raise ConvtoolError(
                    f"circular padding {max(lo, hi)} wraps around more than once for input size "
                    f"{n} (input {_shape_str(shape)}); use padding <= {n}"
                )
            padded = n + lo + hi
            _check_int64(padded, f"the padded input size (input {_shape_str(shape)})")
            extent = d * (k - 1) + 1
            if extent > padded:
                raise ConvtoolError(
                    f"kernel size can't be greater than actual input size: the dilated kernel "
                    f"spans {extent} but the padded input is {padded} (input {_shape_str(shape)}, "
                    f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                    f"padding={self.padding})"
                )
            out.append((padded - extent) // s + 1)
        return self._checked_output(shape, out)

    def _checked_output(self, shape: tuple[int, ...], spatial: list[int]) -> tuple[int, ...]:
        out = (self.out_channels, *spatial)
        _check_int64(
            math.prod(out),
            f"the output element count of {self.kind} on input {_shape_str(shape)} "
            f"(output {_shape_str(out)})",
        )
        return out

    def describe(self) -> str:
        """Short human-readable summary, e.g. 'Conv2d(3, 16, kernel_size=(3, 3), stride=(1, 1))'."""
        parts = [f"{self.in_channels}, {self.out_channels}", f"kernel_size={self.kernel_size}"]
        parts.append(f"stride={self.stride}")
        if self.padding != (0,) * self.ndim:
            parts.append(f"padding={self.padding!r}")
        if self.dilation != (1,) * self.ndim:
            parts.append(f"dilation={self.dilation}")
        if any(self.output_padding):
            parts.append(f"output_padding={self.output_padding}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if not self.bias:
            parts.append("bias=False")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        return f"{self.kind}({', '.join(parts)})"


def build_conv(spec: ConvSpec, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """An `nn.Conv*d` / `nn.ConvTranspose*d` of `spec` whose parameters are `weight` and `bias`.

    The module is created on the meta device, so its own initial weights cost nothing; the given
    tensors become its parameters without a copy.
    """
    kwargs: dict[str, Any] = {
        "stride": spec.stride,
        "padding": spec.padding,
        "dilation": spec.dilation,
        "groups": spec.groups,
        "bias": bias is not None,
        "padding_mode": spec.padding_mode,
        "device": "meta",
        "dtype": weight.dtype,
    }
    if spec.transposed:
        kwargs["output_padding"] = spec.output_padding
    conv: Any = conv_class(spec.ndim, spec.transposed)(
        spec.in_channels, spec.out_channels, spec.kernel_size, **kwargs
    )
    conv.weight = _parameter(weight)
    if bias is not None:
        conv.bias = _parameter(bias)
    return conv


def _parameter(t: Tensor) -> nn.Parameter:
    if isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t.detach(), requires_grad=t.is_floating_point())
