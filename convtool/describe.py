"""Result objects for `inspect`, `toeplitz` and `convert`, and the shape logic every command uses.

Each command calls one function here (or in :mod:`convtool.params` / :mod:`convtool.verification`)
and gets a dataclass back; :mod:`convtool.render` draws it and its `to_dict()` is the `--json`
payload. Nothing here prints, parses flags or exits; messages name parameters (`input_shape`),
which the CLI's error mapper says as flags.

Input shapes: a kernel takes one sample `(C_in, *spatial)` (a leading batch accepted); a model
takes its full example input, batch included, and is run once on zeros of that shape to record
each conv's input (see :func:`convtool.models.trace_source`). A torch.export program knows the
shape it was exported with, so it needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from convtool.errors import ConvtoolError
from convtool.io.source import ConvLayer, Source
from convtool.matrices import MatrixInfo
from convtool.models import Capture, ConversionReport, trace_source

__all__ = [
    "ConvertResult",
    "InspectResult",
    "LayerInfo",
    "ShapePlan",
    "ToeplitzResult",
    "count_shapes",
    "inspect_source",
    "layer_input_shape",
    "resolve_shapes",
]


# ---------------------------------------------------------------------------------- input shapes
def _example(layer: ConvLayer) -> str:
    return ",".join([str(layer.spec.in_channels)] + ["32"] * layer.spec.ndim)


def resolve_shapes(src: Source, input_shape: Sequence[int] | None) -> Capture | None:
    """Fill `layer.input_shape` for every layer of `src`; the model's capture, if it ran.

    Without `input_shape` only what the source already knows is filled (export programs).
    """
    if src.kind == "kernel":
        if input_shape is not None:
            for layer in src.layers:
                layer.input_shape = layer.spec.checked_sample(tuple(input_shape))
        return None
    if input_shape is None:
        return src.capture
    return trace_source(src, tuple(input_shape))


def layer_input_shape(
    src: Source, layer: ConvLayer, input_shape: Sequence[int] | None
) -> tuple[int, ...]:
    """One sample `(C_in, *spatial)` for `layer`, or a ConvtoolError saying what to pass."""
    if src.kind == "kernel":
        if input_shape is None:
            dims = ",".join(("D", "H", "W")[3 - layer.spec.ndim :])
            raise ConvtoolError(
                f"`input_shape` is required for a kernel file: one sample C,{dims}, e.g. "
                f"{_example(layer)}",
                params="input_shape",
            )
        return layer.spec.checked_sample(tuple(input_shape))
    cap = resolve_shapes(src, input_shape)
    if cap is not None and layer.name in cap.conflicts:
        seen = ", ".join(str(s) for s in cap.conflicts[layer.name])
        raise ConvtoolError(
            f"layer {layer.name!r} is called on several input shapes ({seen}); its matrix is "
            f"not unique"
        )
    if layer.input_shape is not None:
        return layer.input_shape
    if src.traced_shape is not None:
        shape = ",".join(map(str, src.traced_shape))
        raise ConvtoolError(
            f"layer {layer.name!r} is not called when the model runs on an input of shape "
            f"{shape}, so its input shape is unknown"
        )
    raise ConvtoolError(
        f"the input shape of layer {layer.name!r} is unknown; pass `input_shape`: the model's "
        f"full example input, batch included, e.g. 1,{_example(layer)}",
        params="input_shape",
    )


@dataclass
class ShapePlan:
    """What `count-params` knows about each layer's input.

    Attributes:
        shapes: layer name -> one-sample input shape (None: none can be used).
        missing: layer name -> why its LC/FC counts are missing.
        notes: report-level notes.
        warnings: things that went wrong but still leave a useful report.
    """

    shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def count_shapes(src: Source, input_shape: Sequence[int] | None) -> ShapePlan:
    """Per-layer input shapes for counting, and why the missing ones are missing.

    A model is traced once (the run is cached on the source). A TorchScript archive that cannot
    be run is still listed, conv form only, with a warning.
    """
    plan = ShapePlan()
    if src.kind == "kernel":
        for layer in src.layers:
            if input_shape is None:
                example = ",".join([str(layer.spec.in_channels)] + ["32"] * layer.spec.ndim)
                plan.missing[layer.name] = (
                    f"no `input_shape`: only the conv form is counted (give one sample, e.g. "
                    f"input_shape={example})"
                )
            else:
                plan.shapes[layer.name] = layer_input_shape(src, layer, input_shape)
        return plan
    try:
        cap = resolve_shapes(src, input_shape)
    except ConvtoolError as exc:
        if "script" not in src.kind.lower():  # only TorchScript is worth listing unrun
            raise
        plan.warnings.append(f"{exc}; listing conv counts only")
        for layer in src.layers:
            plan.shapes[layer.name] = None
            plan.missing[layer.name] = f"the model could not be run: {exc}"
        return plan
    traced = src.traced_shape
    for layer in src.layers:
        if cap is not None and layer.name in cap.conflicts:
            seen = ", ".join(str(s) for s in cap.conflicts[layer.name])
            plan.shapes[layer.name] = None
            plan.missing[layer.name] = (
                f"called on several input shapes ({seen}): no unique LC/FC form"
            )
        elif layer.input_shape is None and traced is not None:
            plan.missing[layer.name] = (
                f"not called when the model runs on an input of shape {traced}: only the conv "
                f"form is counted"
            )
        elif layer.input_shape is None:
            plan.missing[layer.name] = (
                "no `input_shape`: only the conv form is counted (give the model's full "
                "example input, batch included, e.g. input_shape=1,3,224,224)"
            )
    if cap is not None and cap.custom:
        plan.notes.append(
            f"{', '.join(cap.custom)}: forward is not a plain conv with its own weight; "
            f"converting the model leaves such layers as they are"
        )
    if cap is not None and cap.functional:
        plan.notes.append(
            f"{len(cap.functional)} functional conv call(s) (F.conv*, not nn.Conv modules) are "
            f"not counted: {'; '.join(f.describe() for f in cap.functional[:4])}"
        )
    return plan


# ---------------------------------------------------------------------------------- inspect
@dataclass(frozen=True)
class LayerInfo:
    """One conv layer as `inspect` lists it (shapes None without an example input)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    padding_mode: str
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    params: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    output_padding: tuple[int, ...] | None = None  # transposed convs only

    @classmethod
    def of(cls, layer: ConvLayer) -> LayerInfo:
        spec = layer.spec
        shape = layer.input_shape
        return cls(
            name=layer.name,
            kind=spec.kind,
            weight_shape=tuple(layer.weight.shape),
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            kernel_size=tuple(spec.kernel_size),
            stride=tuple(spec.stride),
            padding=spec.padding if isinstance(spec.padding, str) else tuple(spec.padding),
            padding_mode=spec.padding_mode,
            dilation=tuple(spec.dilation),
            groups=spec.groups,
            bias=layer.bias is not None,
            params=_params(layer),
            input_shape=shape,
            output_shape=spec.output_shape(shape) if shape is not None else None,
            output_padding=tuple(spec.output_padding) if spec.transposed else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "padding_mode": self.padding_mode,
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias,
            "params": self.params,
            "input_shape": _list(self.input_shape),
            "output_shape": _list(self.output_shape),
        }
        if self.output_padding is not None:
            out["output_padding"] = list(self.output_padding)
        return out


def _params(layer: ConvLayer) -> int:
    return layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)


def _list(shape: Sequence[int] | None) -> list[int] | None:
    return None if shape is None else list(shape)


@dataclass(frozen=True)
class InspectResult:
    """Every conv layer of a source (or the one asked for), with notes about the rest."""

    source: str
    kind: str
    input_shape: tuple[int, ...] | None
    layers: tuple[LayerInfo, ...]
    notes: tuple[str, ...]

    @property
    def conv_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "input_shape": _list(self.input_shape),
            "layers": [layer.to_dict() for layer in self.layers],
            "conv_params": self.conv_params,
            "notes": list(self.notes),
        }


def inspect_source(
    src: Source, input_shape: Sequence[int] | None = None, layer: str | None = None
) -> InspectResult:
    """The conv layers of `src` (only `layer` when given), traced on `input_shape` if given."""
    cap = resolve_shapes(src, input_shape)
    layers = [src.select(layer)] if layer is not None else src.layers
    notes = list(src.notes)
    if cap is not None:
        fate = (
            "convert rewrites it through the torch.export graph"
            if src.kind == "torchscript"
            else "convert leaves it as it is"
        )
        notes += [
            f"conv call that is not an nn.Conv module: {f.describe()}; {fate}"
            for f in cap.functional
        ]
        notes += [
            f"conv {n!r} has its own forward; its weight may not be what it applies"
            for n in cap.custom
        ]
        notes += [
            f"conv {n!r} is called on several input shapes: {', '.join(map(str, seen))}"
            for n, seen in cap.conflicts.items()
        ]
    if src.is_model and src.traced_shape is not None:
        notes += [
            f"conv {c.name!r} is not called on the example input"
            for c in layers
            if c.input_shape is None
        ]
    return InspectResult(
        source=str(src.path),
        kind=src.kind,
        input_shape=src.traced_shape,
        layers=tuple(LayerInfo.of(c) for c in layers),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------- toeplitz
@dataclass(frozen=True)
class ToeplitzResult:
    """One layer's matrix: its sizes and, when written, where and how.

    Attributes:
        source: the SOURCE path.
        name: the layer's name.
        info: shapes, nonzeros and byte sizes of `T`.
        format: 'dense' or 'sparse' when written, else None.
        outputs: files written (the matrix, then the bias sibling of a .npy).
        seconds: wall time of building and writing.
    """

    source: str
    name: str
    info: MatrixInfo
    format: str | None = None
    outputs: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": self.name,
            **self.info.to_dict(),
            "format": self.format,
            "outputs": list(self.outputs),
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------------------------- convert
FORMAT_NAMES = {
    "export": "torch.export program",
    "torch": "state_dict (.pt)",
    "safetensors": "state_dict (.safetensors)",
}


@dataclass(frozen=True)
class ConvertResult:
    """A converted model written to a file: the per-layer report and the output."""

    report: ConversionReport
    source: str
    source_kind: str
    output: str
    format: str
    bytes_written: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.report.to_dict(),
            "source": self.source,
            "source_kind": self.source_kind,
            "output": self.output,
            "format": FORMAT_NAMES.get(self.format, self.format),
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
        }
