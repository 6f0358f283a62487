"""What a SOURCE argument names: one or more conv layers with their weights.

A source is a raw kernel file plus conv flags, or a checkpoint: a state_dict (.pt/.pth/
.safetensors) with `--model MODULE:CALLABLE`, a TorchScript archive, a torch.export program
(.pt2), or a pickled module (only with `--allow-pickle`). Every subcommand goes through
:func:`load_source`.

This is the one place where the file readers (:mod:`convtool.io`) meet the core that interprets
what they return (:mod:`convtool.inventory` for eager modules, :mod:`convtool.programs` for
TorchScript and torch.export, :mod:`convtool.onnx_graph` for ONNX). Model sources:

- state_dict / pickle: the eager model; conv layers are its `nn.Conv*` modules, named by module
  path as in `model.named_modules()` ('features.0').
- export (.pt2): the program's mirror (:func:`convtool.programs.export_mirror`).
- TorchScript: the `RecursiveScriptModule`, layers read from its attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convtool.dtypes import COMPUTE_DTYPES, compute_dtype
from convtool.errors import ConvtoolError
from convtool.inventory import ConvLayer, module_layers
from convtool.io import checkpoints as ck
from convtool.io.tensors import check_readable, read_tensors, tensors_from_object
from convtool.programs import export_mirror, script_layers
from convtool.spec import ConvSpec

__all__ = ["ConvFlags", "ConvLayer", "Source", "SourceOptions", "load_source", "module_layers"]


@dataclass(frozen=True)
class ConvFlags:
    """Hyperparameters given on the command line for a raw kernel (PyTorch's names)."""

    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] | str = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: int | tuple[int, ...] = 0


@dataclass(frozen=True)
class SourceOptions:
    """Everything that says how to read a SOURCE."""

    flags: ConvFlags = field(default_factory=ConvFlags)
    layer: str | None = None
    bias: Path | None = None
    model: str | None = None
    model_kwargs: str | None = None
    allow_pickle: bool = False
    forward_kwargs: dict[str, Any] | None = None


@dataclass
class Source:
    """A loaded SOURCE: its conv layers and, for checkpoints, the model they belong to.

    Attributes:
        path: the file.
        kind: 'kernel', 'state_dict', 'pickle', 'torchscript' or 'export'.
        layers: its conv layers; for models, named by module path.
        model: the runnable model (None for a kernel): eager for state_dict/pickle, the
            ScriptModule for TorchScript, a GraphModule mirror with real conv modules for export.
        notes: things the user should know (conv calls that are not layers, ...).
        program: the ExportedProgram of an export source.
        example_shape: the input shape the program was exported with (export only).
        traced_shape: the full example input shape `layers[*].input_shape` were recorded for.
        capture: the :class:`convtool.inventory.Inventory` of that run, when the model ran.
        forward_kwargs: further keyword arguments passed to every run of the model.
        onnx: for an ONNX source, its :class:`convtool.onnx_graph.OnnxGraph`.
    """

    path: Path
    kind: str
    layers: list[ConvLayer]
    model: nn.Module | None = None
    notes: list[str] = field(default_factory=list)
    program: Any = None
    example_shape: tuple[int, ...] | None = None
    traced_shape: tuple[int, ...] | None = None
    capture: Any = None
    forward_kwargs: dict[str, Any] | None = None
    onnx: Any = None

    @property
    def is_model(self) -> bool:
        """True for checkpoints (a model runs); False for a raw kernel file."""
        return self.kind != "kernel"

    def select(self, name: str | None) -> ConvLayer:
        """The one layer a single-layer command works on: `layer='NAME'`, or the only one."""
        if not self.layers:
            raise ConvtoolError(
                f"{str(self.path)!r} has no nn.Conv modules; conv calls made by functions "
                f"(F.conv1d(x, self.filters)) are found by running the model: give its example "
                f"input shape (`input_shape`)",
                params=("input_shape",),
            )
        if name is None:
            if len(self.layers) == 1:
                return self.layers[0]
            raise ConvtoolError(
                f"{str(self.path)!r} has {len(self.layers)} conv layers; pick one with "
                f"layer='NAME' ({_names(self.layers)})",
                params=("layer",),
            )
        for layer in self.layers:
            if layer.name == name:
                return layer
        if _is_call_name(name) and self.traced_shape is None and self.model is not None:
            raise ConvtoolError(
                f"{name!r} names a conv call made by a function; such calls are found by running "
                f"the model: give its example input shape"
            )
        raise ConvtoolError(
            f"no conv layer named {name!r} in {str(self.path)!r}; it has {_names(self.layers)}"
        )


def _is_call_name(name: str) -> bool:
    """A functional call's name ('frontend.F.conv1d#0'): known only once the model has run."""
    return "#" in name


def _names(layers: Sequence[ConvLayer], limit: int = 10) -> str:
    names = [layer.name for layer in layers]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def _as_float(t: Tensor, what: str) -> Tensor:
    """Integer kernels in float64 (exact); complex and float8 refused (see convtool.dtypes)."""
    return t.to(compute_dtype(t.dtype, what))


def _kernel_entries(
    tensors: Tensor | dict[str, Tensor], path: Path, layer: str | None
) -> tuple[str, Tensor, Tensor | None]:
    """(name, weight, bias) from a kernel file's contents."""
    stem = path.name.split(".")[0] or "kernel"
    if isinstance(tensors, Tensor):
        if layer is not None:
            raise ConvtoolError(
                f"{str(path)!r} holds a single tensor; drop layer={layer!r}", params=("layer",)
            )
        return stem, tensors, None
    if layer is not None:
        for key in (f"{layer}.weight", layer):
            if key in tensors:
                return layer, tensors[key], tensors.get(f"{layer}.bias")
        raise ConvtoolError(f"no tensor {layer + '.weight'!r} in {str(path)!r}")
    if "weight" in tensors:
        return stem, tensors["weight"], tensors.get("bias")
    if len(tensors) == 1:
        return stem, next(iter(tensors.values())), None
    candidates = [
        k[: -len(".weight")] for k, v in tensors.items() if k.endswith(".weight") and v.dim() >= 3
    ]
    if not candidates:
        raise ConvtoolError(
            f"{str(path)!r} holds {len(tensors)} tensors and none is a conv kernel "
            f"(name.weight with 3-5 dims)"
        )
    if len(candidates) == 1:
        name = candidates[0]
        return name, tensors[f"{name}.weight"], tensors.get(f"{name}.bias")
    raise ConvtoolError(
        f"{str(path)!r} holds several conv kernels; pick one with layer='NAME' "
        f"({', '.join(candidates[:10])}), or give model='MODULE:CALLABLE' for the whole model",
        params=("layer", "model"),
    )


def load_kernel(
    path: Path, options: SourceOptions, contents: Tensor | dict[str, Tensor] | None = None
) -> Source:
    """A source of one conv layer: a raw kernel (or one state_dict entry) plus `options.flags`.

    `contents` is the file's tensors when the caller has read them already.
    """
    if contents is None:
        contents = read_tensors(path)
    name, weight, bias = _kernel_entries(contents, path, options.layer)
    if options.bias is not None:
        extra = read_tensors(options.bias)
        if isinstance(extra, dict):
            if "bias" not in extra and len(extra) != 1:
                raise ConvtoolError(f"{str(options.bias)!r} holds several tensors and no 'bias'")
            extra = extra.get("bias", next(iter(extra.values())))
        bias = extra
    weight = _as_float(weight, f"the kernel in {str(path)!r}")
    if weight.dim() not in (3, 4, 5):
        raise ConvtoolError(
            f"the kernel in {str(path)!r} has shape {tuple(weight.shape)}; a conv kernel has 3, 4 "
            f"or 5 dims: (C_out, C_in/groups, *kernel), e.g. (16, 3, 3, 3) for a 3x3 Conv2d"
        )
    flags = options.flags
    spec = ConvSpec.from_weight(
        tuple(weight.shape),
        stride=flags.stride,
        padding=flags.padding,
        dilation=flags.dilation,
        groups=flags.groups,
        padding_mode=flags.padding_mode,
        transposed=flags.transposed,
        output_padding=flags.output_padding,
        bias=bias is not None,
    )
    if bias is not None:
        bias = _as_float(bias, "the bias").to(weight.dtype)
        if tuple(bias.shape) != (spec.out_channels,):
            raise ConvtoolError(
                f"the bias has shape {tuple(bias.shape)} but the kernel {tuple(weight.shape)} "
                f"needs ({spec.out_channels},)"
            )
    return Source(path, "kernel", [ConvLayer(name, spec, weight, bias)])


def load_source(path: Path, options: SourceOptions) -> Source:
    """Load whatever SOURCE names (see module docstring).

    The format comes from the extension and the archive's content: `.pt2` is a torch.export
    program; a zip with TorchScript code is a TorchScript archive; with `--model` the file is a
    state_dict for that architecture; a file holding a pickled module is loaded only with
    `allow_pickle`; anything else is a kernel file.
    """
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if options.model is not None:
            raise ConvtoolError(
                f"{str(path)!r} is an ONNX model, which holds its own graph; drop "
                f"model={options.model!r}",
                params=("model",),
            )
        return _checked(onnx_source(path), options)
    if options.model_kwargs is not None and options.model is None:
        raise ConvtoolError(
            "`model_kwargs` goes with model='MODULE:CALLABLE'; give both",
            params=("model_kwargs", "model"),
        )
    fmt = ck.detect_format(path)
    if fmt == "unknown" and suffix not in KERNEL_SUFFIXES:
        raise ConvtoolError(
            f"cannot tell the format of {str(path)!r}; convtool reads kernels and state_dicts "
            f"(.npy .npz .pt .pth .bin .ckpt .safetensors), torch.export programs (.pt2), ONNX "
            f"models (.onnx) and TorchScript archives (any extension, found by content)"
        )
    if fmt in ("export", "torchscript") and options.model is not None:
        what = "torch.export program" if fmt == "export" else "TorchScript archive"
        raise ConvtoolError(
            f"{str(path)!r} is a {what}, which holds its own architecture; drop "
            f"model={options.model!r}",
            params=("model",),
        )
    if fmt == "export":
        return _checked(load_export(path, allow_pickle=options.allow_pickle), options)
    if fmt == "torchscript":
        return _checked(load_torchscript(path, allow_pickle=options.allow_pickle), options)
    if options.model is not None:
        return _checked(load_state_dict_source(path, options, fmt), options)
    if fmt == "torch":
        loaded = ck.read_torch_object(path, allow_pickle=options.allow_pickle)
        if isinstance(loaded, torch.jit.ScriptModule):
            return _checked(script_source(path, loaded), options)
        if isinstance(loaded, nn.Module):
            return _checked(eager_source(path, loaded, "pickle"), options)
        return load_kernel(path, options, tensors_from_object(loaded, path))
    return load_kernel(path, options)


KERNEL_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def onnx_source(path: Path, example_shape: Sequence[int] | None = None) -> Source:
    """An ONNX model: its Conv/ConvTranspose nodes (see :mod:`convtool.onnx_graph`)."""
    from convtool.io.onnx_reader import read_onnx
    from convtool.onnx_graph import graph_info, onnx_layers

    model = read_onnx(path)
    info = graph_info(model)
    dims = info.input_shape
    fixed: tuple[int, ...] | None = None
    if dims and all(isinstance(d, int) and d > 0 for d in dims[1:]):
        # only the batch may be symbolic: one sample's shapes do not depend on it
        batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else 1
        fixed = (batch, *(int(d) for d in dims[1:]))
    layers, notes = onnx_layers(model, example_shape or fixed)
    source = Source(path, "onnx", layers, notes=notes, onnx=info)
    if fixed is not None:
        source.example_shape = fixed
        source.traced_shape = fixed
    return source


def _checked(source: Source, options: SourceOptions) -> Source:
    """A model source: refuse kernel-only options, and a model without conv layers."""
    source.forward_kwargs = options.forward_kwargs
    if options.bias is not None:
        raise ConvtoolError(
            f"`bias` applies to raw kernel files; {str(source.path)!r} is a {source.kind} "
            f"checkpoint that holds its own biases",
            params=("bias",),
        )
    if options.layer is not None and not _is_call_name(options.layer):
        source.select(options.layer)  # fail early, listing the names
    if not source.layers and source.kind in ("export", "onnx", "torchscript"):
        extra = f" ({'; '.join(source.notes)})" if source.notes else ""
        raise ConvtoolError(f"{str(source.path)!r} has no conv layers{extra}")
    return source


def check_finite(layer: ConvLayer) -> None:
    """Refuse NaN/inf weights (callers skip it for `allow_nonfinite`)."""
    for what, t in (("weight", layer.weight), ("bias", layer.bias)):
        if t is not None and t.is_floating_point() and t.dtype not in COMPUTE_DTYPES:
            t = t.float()  # float8 has no isfinite; every float8 value is exact in float32
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConvtoolError(
                f"layer {layer.name!r} has {bad} NaN/inf value(s) in its {what}; fix the file or "
                f"pass allow_nonfinite=True",
                params=("allow_nonfinite",),
            )


def eager_source(path: Path, model: nn.Module, kind: str) -> Source:
    """A source for an eager model (state_dict + architecture, or an unpickled module)."""
    model.eval()
    return Source(path, kind, module_layers(model), model=model)


def load_state_dict_source(path: Path, options: SourceOptions, fmt: str) -> Source:
    """A state_dict (.pt/.pth/.safetensors/.npz) loaded into `model`'s architecture."""
    assert options.model is not None
    contents = ck.read_state_dict(path, fmt, allow_pickle=options.allow_pickle)
    if isinstance(contents, Tensor):
        raise ConvtoolError(
            f"{str(path)!r} holds a single tensor, not a state_dict; drop `model` to use it as a "
            f"kernel",
            params=("model",),
        )
    model = ck.import_model(options.model, options.model_kwargs)
    ck.fit_state_dict(model, contents, path, options.model)
    return eager_source(path, model, "state_dict")


def load_torchscript(path: Path, *, allow_pickle: bool = False) -> Source:
    """A TorchScript archive (`torch.jit.save`); see :mod:`convtool.io.checkpoints`."""
    return script_source(path, ck.read_torchscript(path, allow_pickle=allow_pickle))


def script_source(path: Path, model: torch.jit.ScriptModule) -> Source:
    """A source for a scripted model."""
    model.eval()
    return Source(path, "torchscript", script_layers(model, path), model=model)


def load_export(path: Path, *, allow_pickle: bool = False) -> Source:
    """A torch.export program (`torch.export.save`, .pt2), loaded without unpickling anything
    beyond `weights_only=True` unless `allow_pickle` (see :mod:`convtool.io.export_archive`)."""
    return program_source(path, ck.load_program(path, allow_pickle=allow_pickle), "export")


def program_source(path: Path, program: Any, kind: str) -> Source:
    """A source whose model is the mirror of an ExportedProgram (see module docstring)."""
    mirror, layers, notes = export_mirror(program)
    source = Source(path, kind, layers, model=mirror, notes=notes, program=program)
    shapes = [
        tuple(n.meta["val"].shape)
        for n in program.graph.nodes
        if n.op == "placeholder"
        and n.name in program.graph_signature.user_inputs
        and isinstance(n.meta.get("val"), Tensor)
    ]
    if len(shapes) == 1:
        source.example_shape = shapes[0]
        source.traced_shape = shapes[0]
    return source
