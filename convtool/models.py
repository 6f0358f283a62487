"""Whole models: record what every conv sees, and replace convs by their LC or FC forms.

Shapes come from running the model once on an example input, so pads applied outside the convs,
pooling and reshapes between layers are whatever the model really does:

- eager models: forward hooks on every module, plus a `TorchFunctionMode` that sees every conv
  *function* call. A call made while an `nn.Conv*` module's forward runs belongs to that module;
  any other (`F.conv2d(x, self.w)` in some forward) is *functional*: it cannot be replaced by a
  module swap, so it is reported (a warning), never silently left.
- TorchScript modules take no hooks; a `TorchDispatchMode` sees each `aten.convolution` the
  interpreter runs and the weight tensor tells which scripted conv it is.

Converting never touches the model passed in: :func:`convert_model` works on a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from convtool import sizes
from convtool.errors import ConvtoolError
from convtool.forms import ModelTarget, parse
from convtool.resources import check_memory, human_bytes
from convtool.spec import ConvSpec, as_shape, is_conv

_CONV_FUNCTIONS = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    torch.convolution: "convolution",
    torch._convolution: "_convolution",
}
TARGETS = tuple(ModelTarget)


class FunctionalConvWarning(UserWarning):
    """A conv computed by a function call, not an `nn.Conv*` module: it was not converted."""


@dataclass(frozen=True)
class FunctionalConv:
    """A conv function call that is not an `nn.Conv*` module's own.

    Attributes:
        where: module path whose forward made the call ('' for the model's own forward).
        function: 'conv2d', 'conv_transpose1d', ...
        weight_shape: shape of the weight it was called with.
        input_shape: full input shape `(N, C_in, *spatial)` it was called with.
    """

    where: str
    function: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]

    def describe(self) -> str:
        place = f"in {self.where!r}" if self.where else "in the model's forward"
        return f"{self.function} {place} (weight {tuple(self.weight_shape)})"


@dataclass
class Capture:
    """What one run of a model showed about its convs.

    Attributes:
        input_shapes: conv module name -> one-sample input shape `(C_in, *spatial)`.
        conflicts: conv module name -> every shape it saw, for convs called with several.
        functional: conv calls that do not belong to a conv module.
        custom: conv modules whose forward does not compute one conv with their own weight
            (a subclass with its own forward); their matrices are not those of their weights.
    """

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    conflicts: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    functional: list[FunctionalConv] = field(default_factory=list)
    custom: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- capture
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


def _run(model: nn.Module, x: Tensor) -> Any:
    was_training = model.training
    _set_training(model, False)
    try:
        with torch.no_grad():
            return model(x)
    except ConvtoolError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConvtoolError(
            f"running the model on an input of shape {tuple(x.shape)} failed: "
            f"{type(exc).__name__}: {text[:200]} (is `example_input` the model's full input, "
            f"batch included?)",
            params=("example_input",),
        ) from None
    finally:
        _set_training(model, was_training)


def _set_training(model: nn.Module, mode: bool) -> None:
    with contextlib.suppress(NotImplementedError):  # some exported GraphModules refuse it
        model.train(mode)


def _sample(t: Tensor, ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in t.shape)
    return shape[1:] if len(shape) == ndim + 2 else shape


def _add_shape(cap: Capture, name: str, shape: tuple[int, ...]) -> None:
    previous = cap.input_shapes.setdefault(name, shape)
    if previous != shape:
        seen = cap.conflicts.setdefault(name, [previous])
        if shape not in seen:
            seen.append(shape)


def capture(model: nn.Module, example_input: Tensor | Sequence[int]) -> Capture:
    """Run `model` once (eval mode, no grad) and record what every conv in it sees.

    Args:
        model: an eager module, an exported program's GraphModule, or a TorchScript module.
        example_input: the full input `(N, C, *spatial)`, or its shape (zeros are used).
    """
    x = example_tensor(model, example_input)
    if isinstance(model, torch.jit.ScriptModule):
        return _capture_script(model, x)
    return _capture_eager(model, x)


def _check_conv_output(module: nn.Module, name: str, x: Tensor) -> None:
    """Refuse a conv call whose output would not fit in memory, before torch allocates it."""
    try:
        spec = ConvSpec.from_module(module)
        out = spec.output_shape(tuple(x.shape))
    except ConvtoolError:
        return  # not a call the spec describes: torch reports what is wrong with it
    batch = int(x.shape[0]) if x.dim() == spec.ndim + 2 else 1
    check_memory(
        batch * math.prod(out) * x.element_size(),
        f"running conv {name or type(module).__name__!r} on an input of shape "
        f"{tuple(x.shape)} (output {(batch, *out)})",
        "use a smaller input shape",
    )


class _ConvCalls(TorchFunctionMode):
    """Hands every conv function call to `record(function name, args, kwargs)`."""

    def __init__(self, record: Callable[[str, tuple[Any, ...], dict[str, Any]], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        name = _CONV_FUNCTIONS.get(func)
        if name is not None:
            self.record(name, args, kwargs)
        return func(*args, **kwargs)


def _capture_eager(model: nn.Module, x: Tensor) -> Capture:
    cap = Capture()
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    convs = {id(m) for _, m in model.named_modules() if is_conv(m)}
    stack: list[nn.Module] = []
    invocations: dict[str, int] = {}
    weights: dict[str, list[Tensor]] = {}

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        stack.append(module)
        if id(module) in convs and args and isinstance(args[0], Tensor):
            name = names[id(module)]
            _check_conv_output(module, name, args[0])
            invocations[name] = invocations.get(name, 0) + 1
            weight: Any = module.weight
            _add_shape(cap, name, _sample(args[0], weight.dim() - 2))

    def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    def record(function: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inp = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        owner = stack[-1] if stack else None
        if owner is not None and id(owner) in convs:
            if isinstance(weight, Tensor):
                weights.setdefault(names[id(owner)], []).append(weight)
            return
        cap.functional.append(
            FunctionalConv(
                where=names.get(id(owner), "") if owner is not None else "",
                function=function,
                weight_shape=tuple(weight.shape) if isinstance(weight, Tensor) else (),
                input_shape=tuple(inp.shape) if isinstance(inp, Tensor) else (),
            )
        )

    handles = []
    for _, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with _ConvCalls(record):
            _run(model, x)
    finally:
        for handle in handles:
            handle.remove()
    for name, module in model.named_modules():
        if id(module) not in convs or name not in invocations:
            continue
        used = weights.get(name, [])
        own: Any = module.weight
        if len(used) != invocations[name] or not all(
            w is own or (isinstance(w, Tensor) and w.shape == own.shape and torch.equal(w, own))
            for w in used
        ):
            cap.custom.append(name)
    return cap


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


def _capture_script(model: nn.Module, x: Tensor) -> Capture:
    from convtool.io.checkpoints import script_layers

    cap = Capture()
    layers = {
        (layer.weight.data_ptr(), tuple(layer.weight.shape)): layer
        for layer in script_layers(model)
    }

    def record(args: tuple[Any, ...]) -> None:
        inp, weight = args[0], args[1]
        layer = layers.get((weight.data_ptr(), tuple(weight.shape)))
        if layer is None:
            cap.functional.append(
                FunctionalConv("", "convolution", tuple(weight.shape), tuple(inp.shape))
            )
            return
        shape = _sample(inp, layer.spec.ndim)
        if layer.spec.padding_mode != "zeros":  # nn.Conv pads first, then convolves unpadded
            pads = layer.spec.pad_pairs
            shape = (shape[0], *(n - lo - hi for n, (lo, hi) in zip(shape[1:], pads, strict=True)))
        _add_shape(cap, layer.name, shape)

    with _AtenConvs(record):
        _run(model, x)
    return cap


# ---------------------------------------------------------------------------------- converting
@dataclass(frozen=True)
class LayerChange:
    """One conv replaced by its LC/FC form.

    Attributes:
        name: module path.
        layer: the conv, e.g. 'Conv2d(3, 8, kernel_size=(3, 3), ...)'.
        kind: the conv's class name ('Conv2d').
        replacement: the new module's class name.
        input_shape / output_shape: one sample, `(C, *spatial)`.
        params_before / params_after: parameter (and buffer) entries stored; a sparse tensor
            counts its non-zeros.
        bytes_after: bytes the new module's tensors take (sparse: values and indices).
    """

    name: str
    layer: str
    kind: str
    replacement: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params_before: int
    params_after: int
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "replacement": self.replacement,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_after": self.bytes_after,
        }


@dataclass
class ConversionReport:
    """What :func:`convert_with_report` did."""

    to: str
    sparse: bool
    example_shape: tuple[int, ...]
    layers: list[LayerChange] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    functional: list[FunctionalConv] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def warnings(self) -> list[str]:
        """One line per thing left unconverted."""
        lines = [f"conv {name!r} was not converted: {why}" for name, why in self.skipped.items()]
        if self.functional:
            calls = "; ".join(f.describe() for f in self.functional[:8])
            more = f"; ... ({len(self.functional)} in all)" if len(self.functional) > 8 else ""
            lines.append(
                f"{len(self.functional)} functional conv call(s) are not nn.Conv modules and were "
                f"left as they are: {calls}{more}"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "sparse": self.sparse,
            "example_input_shape": list(self.example_shape),
            "layers": [c.to_dict() for c in self.layers],
            "skipped": dict(self.skipped),
            "functional": [f.describe() for f in self.functional],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "warnings": self.warnings(),
        }


def stored_size(module: nn.Module) -> tuple[int, int]:
    """(entries, bytes) of a module's parameters and buffers; sparse tensors count non-zeros."""
    entries = nbytes = 0
    for t in module.state_dict(keep_vars=True).values():
        if not isinstance(t, Tensor):
            continue
        if t.layout == torch.strided:
            entries += t.numel()
            nbytes += t.numel() * t.element_size()
        elif t.layout == torch.sparse_coo:
            n = t._nnz()
            entries += n
            nbytes += sizes.coo_bytes(n, t.element_size(), t.sparse_dim())
        else:  # CSR/CSC/BSR: values + plain indices + compressed pointers
            values = t.values()
            entries += values.numel()
            nbytes += sizes.csr_bytes(values.numel(), t.shape[0], t.element_size())
    return entries, nbytes


def select_layers(names: Sequence[str], pattern: str | None) -> list[str]:
    """Names matching `pattern`: globs ('features.*') or names, comma-separated; all if None."""
    if pattern is None:
        return list(names)
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    if not parts:
        raise ConvtoolError(
            f"`layers` must name layers or globs like 'features.*', got {pattern!r}",
            params=("layers",),
        )
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in parts)]
    unmatched = [p for p in parts if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        listing = ", ".join(names[:12]) + (
            f", ... ({len(names)} in all)" if len(names) > 12 else ""
        )
        raise ConvtoolError(
            f"`layers` {', '.join(repr(p) for p in unmatched)} matches no conv layer; the model "
            f"has {listing or 'none'}",
            params=("layers",),
        )
    return chosen


def _estimate_bytes(
    spec: ConvSpec, shape: tuple[int, ...], to: str, sparse: bool, itemsize: int
) -> int:
    """Bytes the converted layer will hold (an upper bound), computed without building it."""
    from convtool.matrices import matrix_info

    out = spec.output_shape(shape)
    if to == ModelTarget.LC:
        taps = (spec.in_channels // spec.groups) * spec.kernel_numel
        return sizes.lc_entries(out[0], out[1:], taps) * itemsize
    info = matrix_info(spec, shape, _dtype_of(itemsize))
    bias = math.prod(out) * itemsize
    if sparse:  # COO indices while building, CSR kept
        return sizes.coo_bytes(info.nnz, itemsize) + info.csr_bytes + bias
    return info.dense_bytes + bias


def _dtype_of(itemsize: int) -> torch.dtype:
    return {2: torch.float16, 4: torch.float32, 8: torch.float64}.get(itemsize, torch.float32)


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put `new` wherever `old` is registered in `root` (shared modules too); the new root."""
    if root is old:
        return new
    for _, parent in root.named_modules(remove_duplicate=False):
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)
    return root


def convert_with_report(
    model: nn.Module,
    example_input: Tensor | Sequence[int],
    *,
    to: str = ModelTarget.LC,
    sparse: bool = False,
    layers: str | Sequence[str] | None = None,
    memory_limit: int | None = None,
    advance: Callable[[int], None] | None = None,
    inplace: bool = False,
) -> tuple[nn.Module, ConversionReport]:
    """:func:`convert_model`, plus a report of every replaced layer and what was left.

    Args:
        memory_limit: bytes the converted layers may take (default: available memory); checked
            before anything is built.
        advance: called with 1 after each converted layer (a progress bar).
        inplace: convert `model` itself instead of a deep copy.
    """
    from convtool.convert import to_fully_connected, to_locally_connected
    from convtool.dtypes import compute_dtype

    if not isinstance(model, nn.Module):
        raise ConvtoolError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        kernel = getattr(module, "weight", None)
        if is_conv(module) and isinstance(kernel, Tensor):
            compute_dtype(kernel.dtype, f"the weight of conv {name or type(module).__name__!r}")
    to = parse(to, ModelTarget)
    if sparse and to != ModelTarget.FC:
        raise ConvtoolError(
            "sparse=True applies to the fully-connected form: use to='fc'", params=("sparse", "to")
        )
    x = example_tensor(model, example_input)
    if isinstance(model, torch.jit.ScriptModule):
        # Script modules cannot be edited: convert their torch.export graph (a fresh mirror).
        from convtool.io.checkpoints import export_mirror, script_to_program

        model, inplace = export_mirror(script_to_program(model, x))[0], True
    converted = model if inplace else copy.deepcopy(model)
    cap = capture(converted, x)
    conv_names = [n for n, m in converted.named_modules() if is_conv(m)]
    called = {name: i for i, name in enumerate(cap.input_shapes)}
    conv_names.sort(key=lambda n: called.get(n, len(called)))  # in the order the model runs
    pattern = layers if layers is None or isinstance(layers, str) else ",".join(layers)
    chosen = select_layers(conv_names, pattern)
    report = ConversionReport(to.value, sparse, tuple(x.shape), functional=list(cap.functional))
    report.params_before = stored_size(converted)[0]
    plan: list[tuple[str, nn.Module, ConvSpec, tuple[int, ...], int]] = []
    for name in chosen:
        module = converted.get_submodule(name)
        spec = ConvSpec.from_module(module)
        if name not in cap.input_shapes:
            report.skipped[name] = "the model does not call it on the example input"
        elif name in cap.conflicts:
            seen = ", ".join(str(s) for s in cap.conflicts[name])
            report.skipped[name] = f"it is called on several input shapes ({seen})"
        elif name in cap.custom:
            report.skipped[name] = "its forward is not a plain conv with its own weight"
        elif to == ModelTarget.LC and spec.transposed:
            raise ConvtoolError(
                f"layer {name!r} is a {spec.kind}, which has no locally-connected form; use "
                f"to='fc', or leave it out with `layers`",
                params=("to", "layers"),
            )
        else:
            shape = cap.input_shapes[name]
            weight: Any = module.weight
            itemsize = weight.element_size()
            plan.append(
                (name, module, spec, shape, _estimate_bytes(spec, shape, to, sparse, itemsize))
            )
    if plan:
        biggest = max(plan, key=lambda p: p[4])
        total = sum(p[4] for p in plan) + biggest[4]  # + one transient copy while building
        form = {
            ModelTarget.LC: "locally-connected",
            ModelTarget.FC: "sparse FC" if sparse else "dense FC",
        }[to]
        alternative = {
            ModelTarget.LC: "convert fewer layers with `layers`",
            ModelTarget.FC: "use to='lc', or convert fewer layers with `layers`"
            if sparse
            else "use sparse=True or to='lc', or convert fewer layers with `layers`",
        }[to]
        check_memory(
            total,
            f"the {form} form of {len(plan)} layer(s) (largest: {biggest[0] or 'the conv'!r}, "
            f"{human_bytes(biggest[4])})",
            alternative,
            memory_limit,
            params=("layers", "to", "sparse"),
            limit_param="memory_limit",
        )
    root = converted
    for name, module, spec, shape, _ in plan:
        new: nn.Module
        if to == ModelTarget.LC:
            new = to_locally_connected(module, shape)
        else:
            new = to_fully_connected(module, shape, sparse=sparse)
        root = _replace(root, module, new)
        before = stored_size(module)[0]
        after, nbytes = stored_size(new)
        report.layers.append(
            LayerChange(
                name=name,
                layer=spec.describe(),
                kind=spec.kind,
                replacement=type(new).__name__,
                input_shape=shape,
                output_shape=spec.output_shape(shape),
                params_before=before,
                params_after=after,
                bytes_after=nbytes,
            )
        )
        if advance is not None:
            advance(1)
    report.params_after = stored_size(root)[0]
    return root, report


def convert_model(
    model: nn.Module,
    example_input: Tensor | Sequence[int],
    to: str = ModelTarget.LC,
    sparse: bool = False,
    layers: str | Sequence[str] | None = None,
) -> nn.Module:
    """A copy of `model` with every (or every chosen) conv replaced by its LC or FC form.

    The copy computes the same function: each conv becomes the module
    :func:`convtool.to_locally_connected` / :func:`convtool.to_fully_connected` builds for the
    input shape the conv sees when the model runs on `example_input`. The converted model
    accepts inputs of that shape (any batch size the rest of the model allows). `model` itself
    is left untouched; TorchScript models are converted through their torch.export graph.

    Conv calls that are not `nn.Conv*` modules (`F.conv2d(x, w)` in a forward) cannot be
    replaced; they are listed in a :class:`FunctionalConvWarning`.

    Args:
        model: the model, e.g. `(N, 3, H, W) -> logits`.
        example_input: its full input `(N, C, *spatial)`, or that shape (zeros are used).
        to: 'lc' (locally connected) or 'fc' (fully connected).
        sparse: for 'fc', keep each matrix sparse.
        layers: which convs: globs or names ('features.*', 'conv1,conv2'); all when None.

    Returns:
        The converted copy.
    """
    converted, report = convert_with_report(
        model, example_input, to=to, sparse=sparse, layers=layers
    )
    for line in report.warnings():
        warnings.warn(line, FunctionalConvWarning, stacklevel=2)
    return converted


# ---------------------------------------------------------------------------------- reloading
def load_converted(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a converted model saved as a state_dict (.pt / .safetensors by `convtool convert`).

    `model` is the *original* architecture (its weights do not matter); each conv listed in the
    file's metadata is replaced by its LC/FC form at the recorded input shape (nothing is run),
    then the converted weights are loaded strictly. `model` itself is left untouched.

    Example::

        model = load_converted(make_model(), "digits_lc.safetensors")
    """
    from convtool.convert import to_fully_connected, to_locally_connected
    from convtool.io.model_files import read_converted

    state, meta = read_converted(Path(path))
    to, sparse = meta["to"], bool(meta.get("sparse", False))
    root = copy.deepcopy(model)
    for entry in meta["layers"]:
        name, shape = entry["name"], tuple(entry["input_shape"])
        try:
            module = root.get_submodule(name) if name else root
        except AttributeError:
            raise ConvtoolError(
                f"{str(path)!r} converts layer {name!r}, which this model does not have; pass "
                f"the architecture it was converted from"
            ) from None
        if not is_conv(module):
            raise ConvtoolError(f"layer {name!r} of this model is not a conv; wrong architecture?")
        new: nn.Module
        if to == ModelTarget.LC:
            new = to_locally_connected(module, shape)
        else:
            new = to_fully_connected(module, shape, sparse=sparse)
        root = _replace(root, module, new)
    try:
        root.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()
        raise ConvtoolError(
            f"the converted weights in {str(path)!r} do not fit this model: "
            f"{' '.join(t.strip() for t in text[:3])[:300]}"
        ) from None
    return root


# ---------------------------------------------------------------------------------- sources
def trace_source(source: Any, example_shape: Sequence[int]) -> Capture:
    """Fill `layer.input_shape` of every layer of a model source for `example_shape`.

    Export programs already know their shapes for the shape they were exported with; anything
    else is run once (see :func:`capture`). The capture is kept on the source, so tracing twice
    for one shape costs nothing.

    Args:
        source: a :class:`convtool.io.source.Source` with a model.
        example_shape: the full example input `(N, C, *spatial)`.
    """
    shape = tuple(int(s) for s in example_shape)
    cached = getattr(source, "capture", None)
    if source.traced_shape == shape and cached is not None:
        return cached
    if source.model is None:
        raise ConvtoolError(f"{str(source.path)!r} is a kernel file; it has no model to run")
    if source.kind == "export" and shape == source.example_shape:
        cap = Capture(
            input_shapes={
                layer.name: layer.input_shape
                for layer in source.layers
                if layer.input_shape is not None
            }
        )
    else:
        try:
            cap = capture(source.model, shape)
        except ConvtoolError as exc:
            if source.kind == "export" and source.example_shape is not None:
                raise ConvtoolError(
                    f"{exc}; {str(source.path)!r} was exported for input shape "
                    f"{','.join(map(str, source.example_shape))}"
                ) from None
            raise
        for layer in source.layers:
            layer.input_shape = cap.input_shapes.get(layer.name)
    source.traced_shape = shape
    source.capture = cap
    return cap


# ---------------------------------------------------------------------------------- export
class SparseLinearMap(nn.Module):
    """`y = T x + b` on flattened samples, with `T` held as COO index and value buffers.

    torch.export does not take sparse tensors; this computes the same sparse product with
    `index_add` so a sparse FC model can be written as a `.pt2` program.

    Args:
        matrix: sparse `T` of shape `(prod(out_shape), prod(in_shape))`.
        bias: `(prod(out_shape),)`.
        out_shape: one output sample's shape, e.g. `(C_out, H_out, W_out)`.
    """

    def __init__(self, matrix: Tensor, bias: Tensor, out_shape: Sequence[int]) -> None:
        super().__init__()
        coo = matrix.detach().to_sparse_coo().coalesce()
        self.register_buffer("rows", coo.indices()[0].clone())
        self.register_buffer("cols", coo.indices()[1].clone())
        self.register_buffer("values", coo.values().clone())
        self.register_buffer("bias", bias.detach().reshape(-1).clone())
        self.out_shape = tuple(int(s) for s in out_shape)

    rows: Tensor
    cols: Tensor
    values: Tensor
    bias: Tensor

    def forward(self, x: Tensor) -> Tensor:
        """`(N, *in_shape)` -> `(N, *out_shape)`."""
        n = x.shape[0]
        taps = x.reshape(n, -1)[:, self.cols] * self.values
        y = self.bias.expand(n, -1).index_add(1, self.rows, taps)
        return y.reshape(n, *self.out_shape)


def _sparse_tensors(module: nn.Module) -> list[Tensor]:
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [t for _, t in own if isinstance(t, Tensor) and t.layout != torch.strided]


def _exportable(model: nn.Module, x: Tensor) -> nn.Module:
    """`model` with every module that holds a sparse tensor swapped for a SparseLinearMap."""
    holders = {id(m): n for n, m in model.named_modules() if _sparse_tensors(m)}
    if not holders:
        return model
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if id(module) in holders and args and isinstance(args[0], Tensor):
            seen.setdefault(id(module), (args[0][:1].clone(), output))

    handles = [m.register_forward_hook(hook) for _, m in model.named_modules()]
    try:
        _run(model, x)
    finally:
        for handle in handles:
            handle.remove()
    root = model
    for name, module in list(model.named_modules()):
        if id(module) not in holders:
            continue
        hint = "write .pt or .safetensors instead, or convert without sparse=True"
        tensors = _sparse_tensors(module)
        if (
            id(module) not in seen
            or len(tensors) != 1
            or not isinstance(seen[id(module)][1], Tensor)
        ):
            raise ConvtoolError(
                f"cannot export the sparse layer {name!r} to .pt2; {hint}", params=("sparse",)
            )
        sample, output = seen[id(module)]
        with torch.no_grad():
            bias = module(torch.zeros_like(sample)).reshape(-1)
            swap = SparseLinearMap(tensors[0], bias, tuple(output.shape[1:]))
            probe = torch.randn_like(sample)
            same = torch.allclose(swap(probe), module(probe), rtol=1e-5, atol=1e-6)
        if tensors[0].dim() != 2 or not same:
            raise ConvtoolError(
                f"cannot export the sparse layer {name!r} to .pt2; {hint}", params=("sparse",)
            )
        root = _replace(root, module, swap)
    return root


def export_converted(model: nn.Module, example_input: Tensor | Sequence[int]) -> Any:
    """A torch.export program of a converted model, checked against it on the example input.

    Modules holding sparse matrices are exported as :class:`SparseLinearMap` (same product).
    The program runs without convtool and only on inputs of the example's shape.
    """
    from convtool.io.checkpoints import quiet

    x = example_tensor(model, example_input)
    module = _exportable(model, x)
    _set_training(module, False)
    try:
        with quiet(), torch.no_grad():
            try:  # any batch size, when the model allows it (a batch of 1 would be fixed)
                batch = {0: torch.export.Dim.DYNAMIC}
                # a fresh tensor: a failed dynamic export leaves marks on its input
                wide = x.expand(max(2, x.shape[0]), *x.shape[1:]).clone()
                program = torch.export.export(module, (wide,), dynamic_shapes=(batch,))
            except Exception:
                program = torch.export.export(module, (x,))
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConvtoolError(
            f"torch.export could not export the converted model: {type(exc).__name__}: "
            f"{text[:200]}; write .pt or .safetensors instead"
        ) from None
    with torch.no_grad():
        expected, actual = _run(model, x), program.module()(x)
    if isinstance(expected, Tensor) and isinstance(actual, Tensor):
        try:
            torch.testing.assert_close(actual, expected)
        except AssertionError:
            raise ConvtoolError(
                "the exported program does not reproduce the converted model (a bug: please "
                "report it); write .pt or .safetensors instead"
            ) from None
    return program
