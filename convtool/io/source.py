"""What a SOURCE argument names: one or more conv layers with their weights.

A source is a raw kernel file plus conv flags, or a checkpoint: a state_dict (.pt/.pth/
.safetensors) with `--model MODULE:CALLABLE`, a TorchScript archive, a torch.export program
(.pt2), or a pickled module (only with `--allow-pickle`). Every subcommand goes through
:func:`load_source`; the checkpoint loaders live in :mod:`convtool.io.checkpoints`.
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
from convtool.io.tensors import check_readable, read_tensors, tensors_from_object
from convtool.spec import ConvSpec, is_conv


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


@dataclass
class ConvLayer:
    """One conv layer of a source.

    Attributes:
        name: the module path in the model ('features.0'), or the kernel file's stem.
        spec: its hyperparameters.
        weight: as PyTorch stores it, `(C_out, C_in/groups, *kernel)` (transposed: in/out swapped).
        bias: `(C_out,)` or None.
        input_shape: one sample `(C_in, *spatial)` when the source knows it (a traced model).
        module: the live nn.Module when the source has one.
    """

    name: str
    spec: ConvSpec
    weight: Tensor
    bias: Tensor | None
    input_shape: tuple[int, ...] | None = None
    module: nn.Module | None = None


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
        capture: the :class:`convtool.models.Capture` of that run, when the model was run.
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

    @property
    def is_model(self) -> bool:
        """True for checkpoints (a model runs); False for a raw kernel file."""
        return self.kind != "kernel"

    def select(self, name: str | None) -> ConvLayer:
        """The one layer a single-layer command works on: `layer='NAME'`, or the only one."""
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
        raise ConvtoolError(
            f"no conv layer named {name!r} in {str(self.path)!r}; it has {_names(self.layers)}"
        )


def module_layers(model: nn.Module) -> list[ConvLayer]:
    """The `nn.Conv*` modules of an eager model, in `named_modules()` order."""
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
    from convtool.io import checkpoints as ck

    check_readable(path)
    if options.model_kwargs is not None and options.model is None:
        raise ConvtoolError(
            "`model_kwargs` goes with model='MODULE:CALLABLE'; give both",
            params=("model_kwargs", "model"),
        )
    fmt = ck.detect_format(path)
    if fmt in ("export", "torchscript") and options.model is not None:
        what = "torch.export program" if fmt == "export" else "TorchScript archive"
        raise ConvtoolError(
            f"{str(path)!r} is a {what}, which holds its own architecture; drop "
            f"model={options.model!r}",
            params=("model",),
        )
    if fmt == "export":
        return _checked(ck.load_export(path, allow_pickle=options.allow_pickle), options)
    if fmt == "torchscript":
        return _checked(ck.load_torchscript(path, allow_pickle=options.allow_pickle), options)
    if options.model is not None:
        return _checked(ck.load_state_dict_source(path, options, fmt), options)
    if fmt == "torch":
        loaded = ck.load_torch_file(path, options)
        if isinstance(loaded, Source):
            return _checked(loaded, options)
        return load_kernel(path, options, tensors_from_object(loaded, path))
    return load_kernel(path, options)


def _checked(source: Source, options: SourceOptions) -> Source:
    """A model source: refuse kernel-only options, and a model without conv layers."""
    if options.bias is not None:
        raise ConvtoolError(
            f"`bias` applies to raw kernel files; {str(source.path)!r} is a {source.kind} "
            f"checkpoint that holds its own biases",
            params=("bias",),
        )
    if options.layer is not None:
        source.select(options.layer)  # fail early, listing the names
    if not source.layers:
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
