"""Whole models: replace the computation of conv calls by their LC or FC forms, and reload.

What a model's conv calls are (names, specs, input shapes) is :mod:`convtool.inventory`'s job.
Converting keeps the model and swaps each chosen call's *computation*: the converted model is a
:class:`ConvertedModel` that runs the original forward with every conv call intercepted, so
whatever a forward does around the conv (a subclass reshaping around `super().forward`, a
functional `F.conv1d(x, self.filters)`, pads, scaling) stays, and any batch size works.

Converting never touches the model passed in: :func:`convert_model` works on a deep copy.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convtool import sizes
from convtool.errors import ConvtoolError
from convtool.forms import ModelTarget, model_target
from convtool.inventory import (
    ConvCall,
    ConvLayer,
    FunctionalConv,
    Inventory,
    _set_training,
    example_tensor,
    intercept,
    run_model,
    select,
)
from convtool.inventory import capture as capture
from convtool.resources import check_memory, human_bytes
from convtool.spec import CONV_TYPES, ConvSpec, build_conv, is_conv

TARGETS = tuple(ModelTarget)
Capture = Inventory  # the name earlier releases used
__all__ = [
    "Capture",
    "ConversionReport",
    "ConvertedModel",
    "FunctionalConv",
    "FunctionalConvWarning",
    "LayerChange",
    "capture",
    "convert_model",
    "convert_with_report",
    "example_tensor",
    "export_converted",
    "rebuild_converted",
    "stored_size",
]


class FunctionalConvWarning(UserWarning):
    """A conv call was left as it is (its weight is computed from the input, or it was skipped)."""


def _run(model: nn.Module, x: Tensor, forward_kwargs: Mapping[str, Any] | None = None) -> Any:
    return run_model(model, x, forward_kwargs)


# ---------------------------------------------------------------------------------- converting
@dataclass(frozen=True)
class LayerChange:
    """One conv replaced by its LC/FC form.

    Attributes:
        name: the call's name (see :mod:`convtool.inventory`).
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
    call: str = "module"
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "call": self.call,
            "spec": dict(self.spec),
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
                f"{len(self.functional)} conv call(s) compute their weight or bias from the input "
                f"and were left as they are: {calls}{more}"
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


def form_key(name: str) -> str:
    """The `ConvertedModel.forms` key of a call name ('.' cannot be in a module name)."""
    return name.replace(".", "/") if name else "(root)"


class ConvertedModel(nn.Module):
    """A model whose chosen conv calls are computed by their LC/FC forms.

    `model` runs as it is; each conv call it makes (named as in :mod:`convtool.inventory`) that
    has a form, on the one-sample input shape the form was built for, is computed by the form.
    Any other call (another input size, a call not converted) runs the original conv, so the
    model accepts every batch size (and every input) the original accepts.

    Attributes:
        model: the original model; the converted convs' own weights are kept as non-persistent
            buffers (not in `state_dict()`, not trained) since its forward still reads them.
        forms: call name (see :func:`form_key`) -> its LC/FC module.
        input_shapes: call name -> the one-sample input shape its form computes.
    """

    def __init__(
        self,
        model: nn.Module,
        forms: Mapping[str, nn.Module],
        input_shapes: Mapping[str, tuple[int, ...]],
    ) -> None:
        super().__init__()
        self.model = model
        self.forms = nn.ModuleDict({form_key(n): f for n, f in forms.items()})
        self.input_shapes = {n: tuple(s) for n, s in input_shapes.items()}

    def _handle(self, call: ConvCall, run: Callable[[], Any]) -> Any:
        shape = self.input_shapes.get(call.name)
        if shape is None or call.input.dim() != len(shape) + 1:
            return run()
        if tuple(call.input.shape[1:]) != shape:
            return run()
        return self.forms[form_key(call.name)](call.input)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with intercept(self.model, self._handle):
            return self.model(*args, **kwargs)


def _demote(module: nn.Module, names: Sequence[str]) -> None:
    """Turn `module`'s own parameters `names` into non-persistent buffers (kept, not saved)."""
    for pname in names:
        t = module._parameters.get(pname)
        if t is None:
            continue
        del module._parameters[pname]
        module.register_buffer(pname, t.detach(), persistent=False)


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
    forward_kwargs: Mapping[str, Any] | None = None,
    before_build: Callable[[int], None] | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """:func:`convert_model`, plus a report of every replaced call and what was left.

    Args:
        memory_limit: bytes the converted layers may take (default: available memory); checked
            before anything is built.
        advance: called with 1 after each converted layer (a progress bar).
        inplace: convert `model` itself instead of a deep copy.
        forward_kwargs: further keyword arguments of the model's forward.
        before_build: called with the estimated bytes of all the forms, after the memory check
            and before anything is built (e.g. a disk check for the file they will fill).
    """
    from convtool.convert import to_fully_connected, to_locally_connected
    from convtool.dtypes import compute_dtype

    if not isinstance(model, nn.Module):
        raise ConvtoolError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        kernel = getattr(module, "weight", None)
        if is_conv(module) and isinstance(kernel, Tensor):
            compute_dtype(kernel.dtype, f"the weight of conv {name or type(module).__name__!r}")
    to = model_target(to, sparse)
    if isinstance(model, torch.jit.ScriptModule):
        raise ConvtoolError(SCRIPT_REFUSAL)
    x = example_tensor(model, example_input)
    converted = model if inplace else copy.deepcopy(model)
    inv = capture(converted, x, forward_kwargs)
    chosen = set(select([layer.name for layer in inv.layers], layers))
    report = ConversionReport(to.value, sparse, tuple(x.shape), functional=list(inv.computed))
    report.params_before = stored_size(converted)[0]
    plan: list[tuple[ConvLayer, tuple[int, ...], int]] = []
    for layer in inv.layers:
        if layer.name not in chosen:
            continue
        if layer.skipped is not None:
            report.skipped[layer.name] = layer.skipped
        elif layer.input_shape is None:
            report.skipped[layer.name] = "the model does not call it on the example input"
        elif to == ModelTarget.LC and layer.spec.transposed:
            raise ConvtoolError(
                f"layer {layer.name!r} is a {layer.spec.kind}, which has no locally-connected "
                f"form; use to='fc', or leave it out with `layers`",
                params=("to", "layers"),
            )
        else:
            compute_dtype(layer.weight.dtype, f"the weight of conv call {layer.name!r}")
            shape = layer.input_shape
            itemsize = layer.weight.element_size()
            plan.append((layer, shape, _estimate_bytes(layer.spec, shape, to, sparse, itemsize)))
    if plan:
        biggest = max(plan, key=lambda p: p[2])
        total = sum(p[2] for p in plan) + biggest[2]  # + one transient copy while building
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
            f"the {form} form of {len(plan)} layer(s) (largest: {biggest[0].name or 'the conv'!r}, "
            f"{human_bytes(biggest[2])})",
            alternative,
            memory_limit,
            params=("layers", "to", "sparse"),
            limit_param="memory_limit",
        )
        if before_build is not None:
            before_build(sum(p[2] for p in plan))
    forms: dict[str, nn.Module] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, shape, _ in plan:
        conv = build_conv(layer.spec, layer.weight, layer.bias)
        new: nn.Module
        if to == ModelTarget.LC:
            new = to_locally_connected(conv, shape)
        else:
            new = to_fully_connected(conv, shape, sparse=sparse)
        forms[layer.name], shapes[layer.name] = new, shape
        after, nbytes = stored_size(new)
        report.layers.append(
            LayerChange(
                name=layer.name,
                layer=layer.spec.describe(),
                kind=layer.spec.kind,
                replacement=type(new).__name__,
                input_shape=shape,
                output_shape=layer.spec.output_shape(shape),
                params_before=layer.weight.numel()
                + (layer.bias.numel() if layer.bias is not None else 0),
                params_after=after,
                bytes_after=nbytes,
                call=layer.call,
                spec=spec_dict(layer.spec),
            )
        )
        if advance is not None:
            advance(1)
    root = _assemble(converted, inv.layers, forms, shapes)
    report.params_after = stored_size(root)[0]
    return root, report


SCRIPT_REFUSAL = (
    "a TorchScript module cannot be converted: its conv calls run inside the TorchScript "
    "interpreter, where no form can take their place; convert the eager model (its state_dict "
    "with the model's code) or a torch.export program (.pt2) of it instead"
)


def _assemble(
    model: nn.Module,
    calls: Sequence[ConvLayer],
    forms: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, ...]],
) -> nn.Module:
    """The converted model: a plain conv model becomes its form; else a ConvertedModel."""
    if not forms:
        return model
    if type(model) in CONV_TYPES and list(forms) == [""]:
        return forms[""]
    by_name = {layer.name: layer for layer in calls}
    converted_calls = set(forms)
    for layer in calls:
        # an nn.Conv module whose every call is converted no longer needs its own parameters
        if layer.call == "module" and layer.module is not None and layer.name in converted_calls:
            owner = layer.module
            others = [
                other
                for other in by_name.values()
                if other.module is owner and other.name not in converted_calls
            ]
            if not others:
                _demote(owner, ["weight", "bias"])
    return ConvertedModel(model, forms, shapes)


def spec_dict(spec: ConvSpec) -> dict[str, Any]:
    """A ConvSpec as JSON-ready values (:func:`spec_from_dict` reads it back)."""
    return {
        "ndim": spec.ndim,
        "in_channels": spec.in_channels,
        "out_channels": spec.out_channels,
        "kernel_size": list(spec.kernel_size),
        "stride": list(spec.stride),
        "padding": spec.padding if isinstance(spec.padding, str) else list(spec.padding),
        "dilation": list(spec.dilation),
        "groups": spec.groups,
        "padding_mode": spec.padding_mode,
        "transposed": spec.transposed,
        "output_padding": list(spec.output_padding) if spec.transposed else 0,
        "bias": spec.bias,
    }


def spec_from_dict(values: Mapping[str, Any]) -> ConvSpec:
    """The ConvSpec :func:`spec_dict` wrote."""
    try:
        return ConvSpec.create(**dict(values))
    except TypeError as exc:
        raise ConvtoolError(f"a damaged conv spec in converted-model metadata: {exc}") from None


def convert_model(
    model: nn.Module,
    example_input: Tensor | Sequence[int],
    to: str = ModelTarget.LC,
    sparse: bool = False,
    layers: str | Sequence[str] | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A copy of `model` with every (or every chosen) conv call computed by its LC or FC form.

    The copy computes the same function: each conv call (an `nn.Conv*` module, a subclass with
    its own forward, or a functional `F.conv*d` whose weight is a parameter, buffer or
    constant) is computed by the module :func:`convtool.to_locally_connected` /
    :func:`convtool.to_fully_connected` builds for the input shape the call sees when the model
    runs on `example_input`; everything around the call stays. The result accepts any batch
    size the original accepts. `model` itself is left untouched.

    Conv calls whose weight is computed from the input cannot be converted; they are listed in
    a :class:`FunctionalConvWarning`, as are calls skipped for another reason.

    Args:
        model: the model, e.g. `(N, 3, H, W) -> logits`.
        example_input: its full input `(N, C, *spatial)`, or that shape (zeros are used).
        to: 'lc' (locally connected) or 'fc' (fully connected).
        sparse: for 'fc', keep each matrix sparse.
        layers: which calls: globs or names ('features.*', 'conv1,frontend.F.conv1d#0');
            all when None.
        forward_kwargs: further keyword arguments of the model's forward, used to run it.

    Returns:
        The converted copy: a :class:`ConvertedModel` (or, for a bare conv, its form).
    """
    converted, report = convert_with_report(
        model, example_input, to=to, sparse=sparse, layers=layers, forward_kwargs=forward_kwargs
    )
    for line in report.warnings():
        warnings.warn(line, FunctionalConvWarning, stacklevel=2)
    return converted


# ---------------------------------------------------------------------------------- reloading
def rebuild_converted(
    model: nn.Module, state: Mapping[str, Tensor], meta: Mapping[str, Any], path: str | Path
) -> nn.Module:
    """The converted model described by a converted state_dict and its metadata.

    `model` is the *original* architecture (its weights do not matter); each call listed in
    `meta` gets its LC/FC form at the recorded input shape and spec (nothing is run), then
    `state` is loaded strictly. `model` itself is left untouched. `path` names the file in
    messages. Reading the file is :func:`convtool.converted.load_converted`'s job.
    """
    from convtool.convert import to_fully_connected, to_locally_connected

    to, sparse = meta["to"], bool(meta.get("sparse", False))
    root = copy.deepcopy(model)
    forms: dict[str, nn.Module] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    calls: list[ConvLayer] = []
    for entry in meta["layers"]:
        name, shape = entry["name"], tuple(entry["input_shape"])
        if "spec" not in entry:
            raise ConvtoolError(
                f"{str(path)!r} was written by an older convtool (no conv specs in its "
                f"metadata); convert the model again"
            )
        spec = spec_from_dict(entry["spec"])
        ones = torch.ones(spec.weight_shape)  # a fixed, non-zero pattern; loaded over below
        conv = build_conv(spec, ones, torch.ones(spec.out_channels) if spec.bias else None)
        new: nn.Module
        if to == ModelTarget.LC:
            new = to_locally_connected(conv, shape)
        else:
            new = to_fully_connected(conv, shape, sparse=sparse)
        forms[name], shapes[name] = new, shape
        owner = None
        if entry.get("call", "module") == "module":
            try:
                owner = root.get_submodule(name) if name else root
            except AttributeError:
                raise ConvtoolError(
                    f"{str(path)!r} converts layer {name!r}, which this model does not have; "
                    f"pass the architecture it was converted from"
                ) from None
            if not is_conv(owner):
                raise ConvtoolError(
                    f"layer {name!r} of this model is not a conv; wrong architecture?"
                )
        calls.append(ConvLayer(name, spec, ones, None, module=owner,
                               call=entry.get("call", "module")))  # fmt: skip
    root = _assemble(root, calls, forms, shapes)
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
def trace_source(
    source: Any, example_shape: Sequence[int], forward_kwargs: Mapping[str, Any] | None = None
) -> Inventory:
    """Record the conv calls of a model source for `example_shape`; the source's layers become
    them (module convs and functional calls, each with `input_shape` when unique).

    Export programs already know their shapes for the shape they were exported with; anything
    else is run once (see :func:`convtool.inventory.capture`). The inventory is kept on the
    source, so tracing twice for one shape costs nothing.

    Args:
        source: a :class:`convtool.source.Source` with a model.
        example_shape: the full example input `(N, C, *spatial)`.
        forward_kwargs: further keyword arguments of the model's forward (default: the
            source's own `forward_kwargs`).
    """
    shape = tuple(int(s) for s in example_shape)
    kwargs = forward_kwargs if forward_kwargs is not None else source.forward_kwargs
    cached = getattr(source, "capture", None)
    if source.traced_shape == shape and cached is not None:
        return cached
    if source.kind == "onnx":
        from convtool.onnx_graph import onnx_layers

        layers, notes = onnx_layers(source.onnx.model, shape)
        source.layers, source.notes = layers, notes
        inv = Inventory(layers=list(layers), example_shape=shape)
        source.traced_shape, source.capture = shape, inv
        return inv
    if source.model is None:
        raise ConvtoolError(f"{str(source.path)!r} is a kernel file; it has no model to run")
    if source.kind == "export" and shape == source.example_shape:
        inv = Inventory(layers=list(source.layers), example_shape=shape)
        for layer in source.layers:
            if layer.input_shape is not None:
                layer.input_shapes = [layer.input_shape]
    else:
        try:
            inv = capture(source.model, shape, kwargs)
        except ConvtoolError as exc:
            if source.kind == "export" and source.example_shape is not None:
                raise ConvtoolError(
                    f"{exc}; {str(source.path)!r} was exported for input shape "
                    f"{','.join(map(str, source.example_shape))}"
                ) from None
            raise
        source.layers = list(inv.layers)
    source.traced_shape = shape
    source.capture = inv
    return inv


# ---------------------------------------------------------------------------------- export
def _sparse_holder(model: nn.Module) -> str | None:
    """The name of a module other than FullyConnected that holds a sparse tensor, if any.

    FullyConnected exports its sparse product itself (as gathers and `scatter_add`); any other
    sparse parameter or buffer cannot be program state, so it is refused before tracing.
    """
    for name, module in model.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if any(isinstance(t, Tensor) and t.layout != torch.strided for _, t in own):
            return name
    return None


class _Bound(nn.Module):
    """`model(x, **kwargs)` as a one-argument module (the .pt2 takes the tensor only)."""

    def __init__(self, model: nn.Module, kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = dict(kwargs)

    def forward(self, x: Tensor) -> Any:
        return self.model(x, **self.kwargs)


def export_converted(
    model: nn.Module,
    example_input: Tensor | Sequence[int],
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """A torch.export program of a converted model with a dynamic batch dimension, checked
    against the model at the example's batch size and at another one.

    Sparse FullyConnected layers export their own product (gathers and `scatter_add`).
    `forward_kwargs` are fixed into the program, which takes the input tensor only and runs
    without convtool.
    """
    from convtool.programs import quiet

    x = example_tensor(model, example_input)
    model = _Bound(model, forward_kwargs or {})  # one tensor argument: a dynamic batch dim
    holder = _sparse_holder(model)
    if holder is not None:
        raise ConvtoolError(
            f"cannot export the sparse tensor of {holder!r} to .pt2; write .pt or .safetensors "
            "instead, or convert without sparse=True",
            params=("sparse",),
        )
    module = model
    _set_training(module, False)
    dynamic = True
    try:
        with quiet(), torch.no_grad():
            try:  # any batch size, when the model allows it (a batch of 1 would be fixed)
                batch = {0: torch.export.Dim.DYNAMIC}
                # a fresh tensor: a failed dynamic export leaves marks on its input
                wide = x.expand(max(2, x.shape[0]), *x.shape[1:]).clone()
                program = torch.export.export(module, (wide,), dynamic_shapes=(batch,))
            except Exception:
                dynamic = False
                program = torch.export.export(module, (x,))
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConvtoolError(
            f"torch.export could not export the converted model: {type(exc).__name__}: "
            f"{text[:200]}; write .pt or .safetensors instead"
        ) from None
    probes = [x]
    if dynamic:
        other = torch.randn(x.shape[0] + 2, *x.shape[1:], dtype=x.dtype)
        probes.append(other)
    for probe in probes:
        with torch.no_grad():
            expected, actual = _run(model, probe), program.module()(probe)
        if isinstance(expected, Tensor) and isinstance(actual, Tensor):
            try:
                torch.testing.assert_close(actual, expected)
            except AssertionError:
                raise ConvtoolError(
                    "the exported program does not reproduce the converted model (a bug: "
                    "please report it); write .pt or .safetensors instead"
                ) from None
    return program
