"""A model as its conv CALLS: which convs it computes, on which inputs, and why one is skipped.

Every source yields the same records, :class:`ConvLayer`: a name, a :class:`ConvSpec`, the
weights, every one-sample input shape the call was seen with, and why it cannot be converted
(`skipped`). Eager modules, `.pt2` mirrors and TorchScript modules are run once on an example
input (:func:`capture`); ONNX graphs are read without running anything
(:mod:`convtool.onnx_graph`).

Naming (stable: it depends only on the code path, never on tensor values):

- a call an `nn.Conv*d` module (or subclass) makes with its own weight is named after the
  module, e.g. `features.0`;
- any other conv function call (`F.conv1d(x, self.filters)` in some forward) is named after the
  module whose forward makes it, the function, and its index among that module's calls to that
  function in one run of its forward: `frontend.F.conv1d#0`, `frontend.F.conv1d#1`,
  `F.conv2d#0` (the model's own forward).

A call whose weight is computed from the input (attention-style dynamic kernels) cannot be
replaced by a fixed form: it is listed (`computed`), never silently left.

The same interception that names calls at capture replaces them at conversion
(:func:`intercept`): the computation of a conv call is swapped for its form and whatever the
surrounding forward does (reshapes, pads, scaling) stays.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from convtool.errors import ConvtoolError
from convtool.resources import check_memory
from convtool.spec import ConvSpec, as_shape, is_conv

__all__ = [
    "ConvLayer",
    "Inventory",
    "capture",
    "example_tensor",
    "intercept",
    "module_layers",
    "run_model",
    "select",
]

CONV_FUNCTIONS: dict[Any, str] = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    torch.conv1d: "conv1d",
    torch.conv2d: "conv2d",
    torch.conv3d: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d",
    torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d",
    torch.convolution: "convolution",
}
_PADS = (F.pad, torch.nn.functional.pad)


# ---------------------------------------------------------------------------------- records
@dataclass
class ConvLayer:
    """One conv call of a source: what it computes and the inputs it was seen with.

    Attributes:
        name: see the module docstring ('features.0', 'frontend.F.conv1d#0', an ONNX node name,
            or a kernel file's stem).
        spec: its hyperparameters.
        weight: as PyTorch stores it, `(C_out, C_in/groups, *kernel)` (transposed: in/out swapped).
        bias: `(C_out,)` or None.
        input_shape: the one-sample input `(C_in, *spatial)` its matrix is for, when known and
            unique.
        module: the live nn.Module that owns the call, when there is one.
        input_shapes: every one-sample input shape seen (a call may run at several sizes).
        skipped: why it cannot be converted or checked alone (None when it can).
        call: 'module' (an nn.Conv module's own call), 'functional', 'onnx', 'script',
            'kernel'.
        pre_pad: explicit zero padding `((lo, hi), ...)` per spatial dim applied to the input
            before `spec` (whose own padding is then 0): ONNX's asymmetric pads. The layer's
            input is the unpadded one.
        post_crop: `((lo, hi), ...)` per spatial dim cropped from `spec`'s output (an ONNX
            ConvTranspose with asymmetric pads).
        origin: where the call comes from when it is not a module (the ONNX NodeProto).
    """

    name: str
    spec: ConvSpec
    weight: Tensor
    bias: Tensor | None
    input_shape: tuple[int, ...] | None = None
    module: nn.Module | None = None
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    skipped: str | None = None
    call: str = "module"
    pre_pad: tuple[tuple[int, int], ...] | None = None
    post_crop: tuple[tuple[int, int], ...] | None = None
    origin: Any = None

    @property
    def exact_spec(self) -> bool:
        """True when `spec` alone is the layer (no pre-padding or cropping around it)."""
        return self.pre_pad is None and self.post_crop is None

    def add_shape(self, shape: tuple[int, ...]) -> None:
        """Record one more input shape; `input_shape` is kept only while it is unique."""
        if shape not in self.input_shapes:
            self.input_shapes.append(shape)
        self.input_shape = self.input_shapes[0] if len(self.input_shapes) == 1 else None

    @property
    def conflict(self) -> bool:
        """True when the call was seen with several input shapes (no unique matrix)."""
        return len(self.input_shapes) > 1


@dataclass(frozen=True)
class FunctionalConv:
    """A conv call that cannot be converted because its weight is computed from the input.

    Attributes:
        where: module path whose forward made the call ('' for the model's own forward).
        function: 'conv2d', 'conv_transpose1d', ...
        weight_shape: shape of the weight it was called with.
        input_shape: full input shape `(N, C_in, *spatial)` it was called with.
        name: the call's name (see the module docstring).
    """

    where: str
    function: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    name: str = ""

    def describe(self) -> str:
        place = f"in {self.where!r}" if self.where else "in the model's forward"
        label = f"{self.name} " if self.name else ""
        return (
            f"{label}({self.function} {place}, weight {tuple(self.weight_shape)}; weight or bias "
            f"computed from the input)"
        )


@dataclass
class Inventory:
    """What one run of a model showed: its conv calls, in the order first called.

    Attributes:
        layers: every conv call with a fixed weight (module and functional), then the conv
            modules never called (skipped).
        computed: calls whose weight is computed from the input (never converted).
        example_shape: the full example input the model ran on.
    """

    layers: list[ConvLayer] = field(default_factory=list)
    computed: list[FunctionalConv] = field(default_factory=list)
    example_shape: tuple[int, ...] | None = None

    def get(self, name: str) -> ConvLayer | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> the first one-sample input shape seen, for every call that ran."""
        return {layer.name: layer.input_shapes[0] for layer in self.layers if layer.input_shapes}

    @property
    def conflicts(self) -> dict[str, list[tuple[int, ...]]]:
        """name -> every shape seen, for calls seen with several."""
        return {layer.name: list(layer.input_shapes) for layer in self.layers if layer.conflict}

    @property
    def functional(self) -> list[FunctionalConv]:
        """Calls left as they are (weights computed from the input)."""
        return list(self.computed)

    @property
    def custom(self) -> list[str]:
        return []


# ---------------------------------------------------------------------------------- matrices
def padded_sample(layer: ConvLayer, sample: Sequence[int]) -> tuple[int, ...]:
    """The input `spec` sees: `sample` `(C_in, *spatial)` after the layer's pre-padding."""
    shape = tuple(int(s) for s in sample)
    if layer.pre_pad is None:
        return shape
    return (shape[0], *(n + lo + hi for n, (lo, hi) in zip(shape[1:], layer.pre_pad, strict=True)))


def layer_output_shape(layer: ConvLayer, sample: Sequence[int]) -> tuple[int, ...]:
    """`(C_out, *out_spatial)` of the layer on one sample (pre-padding and crops applied)."""
    out = layer.spec.output_shape(padded_sample(layer, sample))
    if layer.post_crop is None:
        return out
    crop = [n - lo - hi for n, (lo, hi) in zip(out[1:], layer.post_crop, strict=True)]
    if any(n <= 0 for n in crop):
        raise ConvtoolError(f"layer {layer.name!r} crops its whole output on input {sample}")
    return (out[0], *crop)


def layer_info(layer: ConvLayer, sample: Sequence[int], dtype: torch.dtype) -> Any:
    """:class:`convtool.matrices.MatrixInfo` of the whole layer (pre-padding and crops
    applied; nnz exact, counted per axis without building anything)."""
    from dataclasses import replace

    from convtool.matrices import matrix_info
    from convtool.sizes import axis_distinct

    sample = layer_sample(layer, sample)
    padded = padded_sample(layer, sample)
    info = matrix_info(layer.spec, padded, dtype)
    if layer.exact_spec:
        return info
    spec = layer.spec
    out = layer_output_shape(layer, sample)
    full_out = spec.output_shape(padded)
    count = (spec.out_channels if not spec.transposed else spec.in_channels) * (
        (spec.in_channels if not spec.transposed else spec.out_channels) // spec.groups
    )
    for axis in range(spec.ndim):
        k, st, d = spec.kernel_size[axis], spec.stride[axis], spec.dilation[axis]
        if spec.transposed:
            lo, hi = layer.post_crop[axis] if layer.post_crop is not None else (0, 0)
            p = spec.pad_pairs[axis][0]
            n = full_out[axis + 1] - lo - hi
            count *= axis_distinct(n, sample[axis + 1], k, st, d, p + lo, "zeros")
        else:
            lo = layer.pre_pad[axis][0] if layer.pre_pad is not None else 0
            count *= axis_distinct(sample[axis + 1], out[axis + 1], k, st, d, lo, "zeros")
    rows, cols = math.prod(out), math.prod(sample)
    return replace(info, input_shape=sample, output_shape=out, shape=(rows, cols), nnz=count)


def layer_sample(layer: ConvLayer, input_shape: Sequence[int]) -> tuple[int, ...]:
    """`input_shape` as one sample `(C_in, *spatial)` of `layer` (a leading batch is dropped),
    checked: the layer can run on it."""
    if layer.exact_spec:
        return layer.spec.checked_sample(input_shape)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == layer.spec.ndim + 2:
        shape = shape[1:]
    layer.spec.sample_shape(
        padded_sample(layer, shape) if len(shape) == layer.spec.ndim + 1 else shape
    )
    layer_output_shape(layer, shape)
    return shape


def _interior(shape: tuple[int, ...], pairs: Sequence[tuple[int, int]]) -> Tensor:
    """Flat C-order indices of the entries of `shape` left after cutting `pairs` per dim."""
    index = torch.arange(math.prod(shape)).reshape(shape)
    cut = [slice(None)] + [slice(lo, n - hi) for n, (lo, hi) in zip(shape[1:], pairs, strict=True)]
    return index[tuple(cut)].reshape(-1)


def layer_matrix(
    layer: ConvLayer, sample: Sequence[int], *, sparse: bool = False, layout: str = "csr"
) -> Tensor:
    """`T` of the whole layer for one sample: `layer(x).flatten() == T @ x.flatten() + b`.

    With pre-padding, `T` is the column subset of the unpadded conv's matrix on the padded
    input (columns of padding multiply zeros); with a crop, the row subset. Exact either way.
    """
    from convtool.matrices import matrix

    sample = layer.spec.sample_shape(sample) if layer.pre_pad is None else tuple(sample)
    padded = padded_sample(layer, sample)
    if layer.exact_spec:
        return matrix(layer.spec, layer.weight, padded, sparse=sparse, layout=layout)  # type: ignore[arg-type]
    t = matrix(layer.spec, layer.weight, padded, sparse=sparse, layout="coo")
    cols = _interior(padded, layer.pre_pad) if layer.pre_pad is not None else None
    out = layer.spec.output_shape(padded)
    rows = _interior(out, layer.post_crop) if layer.post_crop is not None else None
    if not sparse:
        if rows is not None:
            t = t[rows]
        return t[:, cols] if cols is not None else t
    t = t.coalesce()
    r, c = t.indices()
    values = t.values()
    n_rows, n_cols = t.shape
    keep = torch.ones(r.numel(), dtype=torch.bool)
    row_map = torch.arange(n_rows)
    col_map = torch.arange(n_cols)
    if rows is not None:
        row_map = torch.full((n_rows,), -1, dtype=torch.long)
        row_map[rows] = torch.arange(rows.numel())
        keep &= row_map[r] >= 0
        n_rows = rows.numel()
    if cols is not None:
        col_map = torch.full((n_cols,), -1, dtype=torch.long)
        col_map[cols] = torch.arange(cols.numel())
        keep &= col_map[c] >= 0
        n_cols = cols.numel()
    picked = torch.sparse_coo_tensor(
        torch.stack([row_map[r[keep]], col_map[c[keep]]]), values[keep], (n_rows, n_cols)
    ).coalesce()
    return picked.to_sparse_csr() if layout == "csr" else picked


def layer_bias_vector(layer: ConvLayer, sample: Sequence[int], dtype: torch.dtype) -> Tensor:
    """`b` of :func:`layer_matrix` (zeros when the layer has no bias)."""
    from convtool.matrices import bias_vector_for

    padded = padded_sample(layer, sample)
    b = bias_vector_for(layer.spec, layer.bias, padded, dtype)
    if layer.post_crop is None:
        return b
    return b[_interior(layer.spec.output_shape(padded), layer.post_crop)]


# ---------------------------------------------------------------------------------- selector
def select(names: Sequence[str], pattern: str | Sequence[str] | None) -> list[str]:
    """Names a layer pattern picks: shell globs or names, comma-separated; all when None.

    The one selector every command uses (`layers=` in Python). Names may hold '#' and '.'
    (`frontend.F.conv1d#0`); globs match them as plain characters.

    Raises:
        ConvtoolError: the pattern is empty, or one of its parts matches no name.
    """
    if pattern is None:
        return list(names)
    parts = (
        [p.strip() for p in pattern.split(",") if p.strip()]
        if isinstance(pattern, str)
        else [str(p).strip() for p in pattern if str(p).strip()]
    )
    if not parts:
        raise ConvtoolError(
            f"layers= must name layers or globs like 'features.*', got {pattern!r}",
            params=("layers",),
        )
    chosen = [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in parts)]
    unmatched = [p for p in parts if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        listing = ", ".join(names[:12]) + (
            f", ... ({len(names)} in all)" if len(names) > 12 else ""
        )
        raise ConvtoolError(
            f"layers= {', '.join(repr(p) for p in unmatched)} matches no conv layer; the model "
            f"has {listing or 'none'} (globs like 'layer1.*' or 'conv1,conv2' work)",
            params=("layers",),
        )
    return chosen


# ---------------------------------------------------------------------------------- static
def module_layers(model: nn.Module) -> list[ConvLayer]:
    """The `nn.Conv*` modules of an eager model, in `named_modules()` order (nothing is run)."""
    layers = []
    for name, module in model.named_modules():
        if is_conv(module):
            m: Any = module
            layers.append(
                ConvLayer(
                    name=name,
                    spec=ConvSpec.from_module(module),
                    weight=m.weight.detach(),
                    bias=m.bias.detach() if m.bias is not None else None,
                    module=module,
                )
            )
    return layers


# ---------------------------------------------------------------------------------- running
def example_tensor(model: nn.Module, example_input: Tensor | Sequence[int]) -> Tensor:
    """The example input: the tensor given, or zeros of the given shape in the model's dtype."""
    if isinstance(example_input, Tensor):
        return example_input
    shape = as_shape(example_input, "the example input shape")
    if not shape or any(s <= 0 for s in shape):
        raise ConvtoolError(f"the example input shape must be positive ints, got {shape}")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # the input, and about as much again for the activations alive while it runs
    check_memory(
        2 * nbytes,
        f"running the model on an example input of shape {shape}",
        "use a smaller `example_input`",
        params=("example_input",),
    )
    return torch.zeros(shape, dtype=dtype)


RUN_HINT = (
    "if its forward needs more arguments, pass them with `forward_kwargs`; for one layer's "
    "matrix, give that layer's own one-sample input with `layer_input_shape`"
)


RUN_PARAMS = ("example_input", "forward_kwargs", "layer_input_shape")


def run_model(model: nn.Module, x: Tensor, forward_kwargs: Mapping[str, Any] | None = None) -> Any:
    """`model(x, **forward_kwargs)` in eval mode without grad; failures become one clear line."""
    with _evaluating(model, tuple(x.shape)), torch.no_grad():
        return model(x, **dict(forward_kwargs or {}))


@contextlib.contextmanager
def _evaluating(model: nn.Module, shape: tuple[int, ...]) -> Iterator[None]:
    """The model in eval mode (its own mode back afterwards); a failure of the run inside
    becomes one clear line."""
    was_training = model.training
    _set_training(model, False)
    try:
        yield
    except ConvtoolError:
        raise
    except Exception as exc:
        raise ConvtoolError(run_failure(exc, shape), params=RUN_PARAMS) from None
    finally:
        _set_training(model, was_training)


def run_failure(exc: BaseException, shape: tuple[int, ...]) -> str:
    """The one line that says running the model failed, and both ways out."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"running the model on an input of shape {shape} failed: {type(exc).__name__}: "
        f"{text[:200]} (is `example_input` the model's full input, batch included? "
        f"{RUN_HINT})"
    )


def _set_training(model: nn.Module, mode: bool) -> None:
    with contextlib.suppress(NotImplementedError):  # some exported GraphModules refuse it
        model.train(mode)


def _sample(t: Tensor, ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in t.shape)
    return shape[1:] if len(shape) == ndim + 2 else shape


# ---------------------------------------------------------------------------------- interception
@dataclass
class ConvCall:
    """One conv function call as the interceptor sees it.

    Attributes:
        name: see the module docstring.
        owner: module whose forward made it (None: the root's own forward... never; the root
            is a module too).
        owner_name: its path.
        function: 'conv2d', 'conv_transpose1d', 'convolution'.
        input: the conv's input; for a module with a reflect/replicate/circular padding_mode, the
            input *before* that padding (the module's own input).
        weight, bias: the tensors passed.
        spec: the call's spec (None when its arguments are not a valid conv spec: `error`).
        module_call: True when it is an nn.Conv module's call with its own weight.
    """

    name: str
    owner: nn.Module
    owner_name: str
    function: str
    input: Tensor
    weight: Tensor
    bias: Tensor | None
    spec: ConvSpec | None
    module_call: bool
    error: str | None = None


@dataclass
class _Frame:
    module: nn.Module
    name: str
    counters: dict[str, int] = field(default_factory=dict)
    own_done: bool = False
    padded: dict[int, Tensor] = field(default_factory=dict)


def _arguments(function: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The conv call's arguments by name (F.conv*d / F.conv_transpose*d / torch.convolution)."""
    if function == "convolution":
        names = [
            "input",
            "weight",
            "bias",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
        ]
    elif function.startswith("conv_transpose"):
        names = [
            "input",
            "weight",
            "bias",
            "stride",
            "padding",
            "output_padding",
            "groups",
            "dilation",
        ]
    else:
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    values = dict(zip(names, args, strict=False))
    values.update(kwargs)
    return values


def _call_spec(function: str, a: Mapping[str, Any], weight: Tensor) -> ConvSpec:
    ndim = weight.dim() - 2
    transposed = function.startswith("conv_transpose") or bool(a.get("transposed", False))

    def per_dim(value: Any, default: int) -> Any:
        if value is None:
            return default
        if isinstance(value, str):
            return value
        if isinstance(value, int):
            return value
        items = tuple(int(v) for v in value)
        return items * ndim if len(items) == 1 and ndim > 1 else items

    return ConvSpec.from_weight(
        tuple(weight.shape),
        stride=per_dim(a.get("stride"), 1),
        padding=per_dim(a.get("padding"), 0),
        dilation=per_dim(a.get("dilation"), 1),
        groups=int(a.get("groups", 1) or 1),
        transposed=transposed,
        output_padding=per_dim(a.get("output_padding"), 0) if transposed else 0,
        bias=a.get("bias") is not None,
    )


class _Interceptor(TorchFunctionMode):
    """Names every conv function call and hands it to `handle(call, run)`.

    `run()` computes the original call; `handle` returns its result or a replacement. Module
    forward hooks keep the stack of running modules, so a call belongs to the innermost one.
    """

    def __init__(
        self,
        root: nn.Module,
        handle: Callable[[ConvCall, Callable[[], Any]], Any],
    ) -> None:
        super().__init__()
        self.handle = handle
        self.names: dict[int, str] = {}
        for name, module in root.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name)
        self.stack: list[_Frame] = [_Frame(root, "")]
        self.handles: list[Any] = []
        for _, module in root.named_modules():
            if module is root:
                continue
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(_Frame(module, self.names.get(id(module), "")))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if len(self.stack) > 1 and self.stack[-1].module is module:
            self.stack.pop()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        frame = self.stack[-1]
        if func in _PADS and _pads_for_conv(frame):
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and args and isinstance(args[0], Tensor):
                frame.padded[id(out)] = args[0]
            return out
        function = CONV_FUNCTIONS.get(func)
        if function is None:
            return func(*args, **kwargs)
        a = _arguments(function, args, kwargs)
        inp, weight, bias = a.get("input"), a.get("weight"), a.get("bias")
        if not isinstance(inp, Tensor) or not isinstance(weight, Tensor):
            return func(*args, **kwargs)
        owner: Any = frame.module
        module_call = (
            is_conv(owner) and not frame.own_done and weight is getattr(owner, "weight", None)
        )
        spec: ConvSpec | None = None
        error = None
        if module_call:
            frame.own_done = True
            name = frame.name
            original = frame.padded.pop(id(inp), None)
            try:
                spec = ConvSpec.from_module(owner)
                if original is None and spec.padding_mode != "zeros":
                    spec = _call_spec(function, a, weight)
            except ConvtoolError as exc:
                error = str(exc)
            if original is not None:
                inp = original
        else:
            index = frame.counters.get(function, 0)
            frame.counters[function] = index + 1
            name = f"{frame.name}.F.{function}#{index}" if frame.name else f"F.{function}#{index}"
            try:
                spec = _call_spec(function, a, weight)
            except ConvtoolError as exc:
                error = str(exc)
        call = ConvCall(
            name,
            frame.module,
            frame.name,
            function,
            inp,
            weight,
            bias if isinstance(bias, Tensor) else None,
            spec,
            module_call,
            error,
        )
        return self.handle(call, lambda: func(*args, **kwargs))


def _pads_for_conv(frame: _Frame) -> bool:
    m: Any = frame.module
    return is_conv(m) and getattr(m, "padding_mode", "zeros") != "zeros" and not frame.own_done


@contextlib.contextmanager
def intercept(
    root: nn.Module, handle: Callable[[ConvCall, Callable[[], Any]], Any]
) -> Iterator[None]:
    """Within the block, every conv call `root` makes goes through `handle(call, run)`."""
    mode = _Interceptor(root, handle)
    try:
        with mode:
            yield
    finally:
        mode.close()


# ---------------------------------------------------------------------------------- capture
def _stored(model: nn.Module) -> set[int]:
    """ids of every tensor the model holds: parameters, buffers, plain tensor attributes."""
    ids: set[int] = set()
    for module in model.modules():
        ids.update(id(t) for t in module.parameters(recurse=False))
        ids.update(id(t) for t in module.buffers(recurse=False))
        ids.update(id(v) for v in vars(module).values() if isinstance(v, Tensor))
    return ids


def _depends_on(t: Tensor, x: Tensor) -> bool:
    if not (t.requires_grad and x.requires_grad):
        return False
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(t.sum(), x, retain_graph=True, allow_unused=True)
    return grad is not None


def capture(
    model: nn.Module,
    example_input: Tensor | Sequence[int],
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Inventory:
    """Run `model` once (eval mode) and record every conv call it makes.

    Args:
        model: an eager module, an exported program's GraphModule, or a TorchScript module.
        example_input: the full input `(N, C, *spatial)`, or its shape (zeros are used).
        forward_kwargs: further keyword arguments of the model's forward.

    Returns:
        The :class:`Inventory`: module convs named by path, functional calls as described in
        the module docstring; conv modules never called are listed as skipped.
    """
    x = example_tensor(model, example_input)
    if isinstance(model, torch.jit.ScriptModule):
        return _capture_script(model, x, forward_kwargs)
    return _capture_eager(model, x, forward_kwargs)


def _capture_eager(
    model: nn.Module, x: Tensor, forward_kwargs: Mapping[str, Any] | None
) -> Inventory:
    try:  # with autograd, a kernel computed from the input is told from a constant one
        return _capture_eager_run(model, x, forward_kwargs, traced=True)
    except ConvtoolError:
        # some forwards refuse inputs that require grad (.numpy(), in-place ops on the input):
        # run plainly, and leave every kernel the model does not hold as it is
        return _capture_eager_run(model, x, forward_kwargs, traced=False)


def _capture_eager_run(
    model: nn.Module, x: Tensor, forward_kwargs: Mapping[str, Any] | None, traced: bool
) -> Inventory:
    inv = Inventory(example_shape=tuple(x.shape))
    stored = _stored(model)
    source = x.detach().clone().requires_grad_(traced and x.is_floating_point())
    probe = source * 1 if source.requires_grad else source  # not a leaf: in-place ops work
    records: dict[str, ConvLayer] = {}

    def handle(call: ConvCall, run: Callable[[], Any]) -> Any:
        dynamic = any(
            t is not None and id(t) not in stored and (not traced or _depends_on(t, probe))
            for t in (call.weight, call.bias)
        )
        if dynamic:
            if call.name not in {c.name for c in inv.computed}:
                inv.computed.append(
                    FunctionalConv(
                        call.owner_name,
                        call.function,
                        tuple(call.weight.shape),
                        tuple(call.input.shape),
                        call.name,
                    )
                )
            return run()
        layer = records.get(call.name)
        if layer is None:
            if call.spec is None:
                spec = ConvSpec.from_weight(tuple(call.weight.shape))
            else:
                spec = call.spec
            layer = ConvLayer(
                call.name,
                spec,
                call.weight.detach(),
                call.bias.detach() if call.bias is not None else None,
                module=call.owner,
                call="module" if call.module_call else "functional",
                skipped=call.error,
            )
            records[call.name] = layer
            inv.layers.append(layer)
        layer.add_shape(_sample(call.input, layer.spec.ndim))
        _check_output(call)
        return run()

    with (
        _evaluating(model, tuple(x.shape)),
        intercept(model, handle),
        torch.set_grad_enabled(traced),
    ):
        model(probe, **dict(forward_kwargs or {}))
    for layer in inv.layers:
        if layer.conflict and layer.skipped is None:
            seen = ", ".join(str(s) for s in layer.input_shapes)
            layer.skipped = f"it is called on several input shapes ({seen})"
    owners = {id(layer.module) for layer in inv.layers}
    for static in module_layers(model):
        if static.name not in records and id(static.module) not in owners:
            static.skipped = "the model does not call it on the example input"
            inv.layers.append(static)
    return inv


def _check_output(call: ConvCall) -> None:
    """Refuse a conv call whose output would not fit in memory, before torch allocates it."""
    if call.spec is None:
        return
    try:
        out = call.spec.output_shape(tuple(call.input.shape))
    except ConvtoolError:
        return  # not a call the spec describes: torch reports what is wrong with it
    batch = int(call.input.shape[0]) if call.input.dim() == call.spec.ndim + 2 else 1
    check_memory(
        batch * math.prod(out) * call.input.element_size(),
        f"running conv {call.name or call.function!r} on an input of shape "
        f"{tuple(call.input.shape)} (output {(batch, *out)})",
        "use a smaller input shape",
    )


class _AtenConvs(TorchDispatchMode):
    """Hands every `aten.convolution` the dispatcher runs to `record(args)`."""

    def __init__(self, record: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func._schema.name in ("aten::convolution", "aten::_convolution"):
            self.record(args)
        return func(*args, **(kwargs or {}))


def _capture_script(
    model: nn.Module, x: Tensor, forward_kwargs: Mapping[str, Any] | None
) -> Inventory:
    """TorchScript takes no hooks: the dispatcher's convolutions, matched by weight storage."""
    from convtool.programs import script_layers

    inv = Inventory(example_shape=tuple(x.shape))
    layers = {
        (layer.weight.data_ptr(), tuple(layer.weight.shape)): layer
        for layer in script_layers(model)
    }
    for layer in layers.values():
        layer.call = "script"
    owners: dict[tuple[int, tuple[int, ...]], str] = {}
    for tname, t in [*model.named_parameters(), *model.named_buffers()]:
        owners.setdefault((t.data_ptr(), tuple(t.shape)), tname.rpartition(".")[0])
    counters: dict[str, int] = {}
    extra: dict[tuple[str, int], ConvLayer] = {}
    order: list[str] = []

    def record(args: tuple[Any, ...]) -> None:
        inp, weight = args[0], args[1]
        key = (weight.data_ptr(), tuple(weight.shape))
        layer = layers.get(key)
        if layer is None and key in owners:  # a functional call with a stored weight
            owner = owners[key]
            index = counters.get(owner, 0)
            counters[owner] = index + 1
            layer = extra.get((owner, index))
            if layer is None:
                name = f"{owner}.F.convolution#{index}" if owner else f"F.convolution#{index}"
                a = _arguments("convolution", tuple(args), {})
                bias = a.get("bias")
                try:
                    spec = _call_spec("convolution", a, weight)
                    why = None
                except ConvtoolError as exc:
                    spec, why = ConvSpec.from_weight(tuple(weight.shape)), str(exc)
                layer = ConvLayer(
                    name,
                    spec,
                    weight.detach(),
                    bias.detach() if isinstance(bias, Tensor) else None,
                    call="script",
                    skipped=why,
                )
                extra[(owner, index)] = layer
        if layer is None:
            inv.computed.append(
                FunctionalConv(
                    "",
                    "convolution",
                    tuple(weight.shape),
                    tuple(inp.shape),
                    f"F.convolution#{len(inv.computed)}",
                )
            )
            return
        if layer.name not in order:
            order.append(layer.name)
        shape = _sample(inp, layer.spec.ndim)
        if layer.module is not None and layer.spec.padding_mode != "zeros":
            # nn.Conv pads first, then convolves unpadded: the layer's input is before the pad
            pads = layer.spec.pad_pairs
            shape = (shape[0], *(n - lo - hi for n, (lo, hi) in zip(shape[1:], pads, strict=True)))
        layer.add_shape(shape)

    with _AtenConvs(record):
        counters.clear()
        run_model(model, x, forward_kwargs)
    every = {layer.name: layer for layer in [*layers.values(), *extra.values()]}
    called = [every[name] for name in order]
    for layer in [*layers.values(), *extra.values()]:
        if not layer.input_shapes:
            layer.skipped = "the model does not call it on the example input"
        elif layer.conflict:
            seen = ", ".join(str(s) for s in layer.input_shapes)
            layer.skipped = f"it is called on several input shapes ({seen})"
    inv.layers = called + [layer for layer in layers.values() if not layer.input_shapes]
    return inv
