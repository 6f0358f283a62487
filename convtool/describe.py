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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from convtool.errors import ConvtoolError
from convtool.inventory import (
    ConvLayer,
    Inventory,
    layer_output_shape,
    layer_sample,
    padded_sample,
)
from convtool.inventory import select as select_layers
from convtool.matrices import MatrixInfo
from convtool.models import ConversionReport, trace_source
from convtool.source import Source

__all__ = [
    "ConvertResult",
    "InspectResult",
    "LayerInfo",
    "ShapePlan",
    "ToeplitzResult",
    "chosen_layers",
    "count_shapes",
    "inspect_source",
    "layer_input_shape",
    "layers_with_shapes",
    "pick_layer",
    "resolve_shapes",
]


# ---------------------------------------------------------------------------------- input shapes
def _example(layer: ConvLayer) -> str:
    return ",".join([str(layer.spec.in_channels)] + ["32"] * layer.spec.ndim)


def resolve_shapes(src: Source, input_shape: Sequence[int] | None) -> Inventory | None:
    """Fill `layer.input_shape` for every layer of `src`; the model's inventory, if it ran.

    Without `input_shape` only what the source already knows is filled (export programs, ONNX
    shape inference).
    """
    if src.kind == "kernel":
        if input_shape is not None:
            for layer in src.layers:
                layer.input_shape = layer.spec.checked_sample(tuple(input_shape))
        return None
    if input_shape is None:
        return src.capture
    return trace_source(src, tuple(input_shape))


def pick_layer(
    src: Source,
    name: str | None,
    input_shape: Sequence[int] | None,
    layer_input_shape: Sequence[int] | None = None,
) -> ConvLayer:
    """The layer a single-layer command works on (`layer=`), after tracing when the model must
    run. With `layer_input_shape` nothing runs: the layer comes from what the source lists
    without running (its conv modules, a graph's conv nodes)."""
    if layer_input_shape is None and src.is_model and input_shape is not None:
        resolve_shapes(src, input_shape)
    return src.select(name)


def layer_input_shape(
    src: Source,
    layer: ConvLayer,
    input_shape: Sequence[int] | None,
    layer_input: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """One sample `(C_in, *spatial)` for `layer`, or a ConvtoolError saying what to pass.

    `layer_input` (`layer_input_shape=`) is the layer's own one-sample input: the model is not
    run.
    """
    if layer_input is not None:
        return layer_sample(layer, tuple(layer_input))
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
    layer = next((x for x in src.layers if x.name == layer.name), layer)  # the traced record
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
    if layer.skipped is not None:
        raise ConvtoolError(
            f"layer {layer.name!r}: {layer.skipped} (`input_shape`)", params=("input_shape",)
        )
    raise ConvtoolError(
        f"the input shape of layer {layer.name!r} is unknown; pass `input_shape`: the model's "
        f"full example input, batch included, e.g. 1,{_example(layer)}, or the layer's own "
        f"one-sample input with layer_input_shape={_example(layer)}",
        params=("input_shape", "layer_input_shape"),
    )


def chosen_layers(src: Source, layer: str | None, layers: str | None) -> list[ConvLayer]:
    """The layers a multi-layer command works on: `layer='NAME'` alone, else those matching the
    `layers` globs (all when None), in the source's order."""
    if layer is not None:
        return [src.select(layer)]
    names = set(select_layers([c.name for c in src.layers], layers))
    return [c for c in src.layers if c.name in names]


def layers_with_shapes(
    src: Source,
    chosen: Sequence[ConvLayer],
    input_shape: Sequence[int] | None,
    explain: Callable[[ConvtoolError], str] = str,
    verb: str = "checked",
) -> tuple[list[tuple[ConvLayer, tuple[int, ...]]], list[str]]:
    """Each layer with its one-sample input shape `(C_in, *spatial)`, and notes.

    A conv the model calls on several shapes comes once per shape; a model's conv whose shape
    is unknown (the example input does not call it) is left out with a note, which `explain`
    words from the error (the CLI spells parameters as flags). Raises when nothing is left.
    `verb` says what the caller does with each layer ('checked', 'analysed'), for the notes.
    """
    pairs: list[tuple[ConvLayer, tuple[int, ...]]] = []
    notes: list[str] = []
    cap = resolve_shapes(src, input_shape) if src.is_model else None
    for conv in chosen:
        if cap is not None and conv.name in cap.conflicts:
            shapes = cap.conflicts[conv.name]
            seen = ", ".join("(" + ",".join(map(str, s)) + ")" for s in shapes)
            notes.append(f"{conv.name!r} is called on {len(shapes)} input shapes {seen}: each "
                         f"is {verb}")  # fmt: skip
            pairs.extend((conv, tuple(s)) for s in shapes)
            continue
        try:
            pairs.append((conv, layer_input_shape(src, conv, input_shape)))
        except ConvtoolError as exc:
            if not src.is_model or len(chosen) == 1:
                raise
            notes.append(f"not {verb}: {explain(exc)}")
    if not pairs:
        raise ConvtoolError(f"no conv layer could be {verb}: {'; '.join(notes)}")
    return pairs, notes


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


def count_shapes(
    src: Source,
    input_shape: Sequence[int] | None,
    layer: str | None = None,
    layer_input_shape: Sequence[int] | None = None,
) -> ShapePlan:
    """Per-layer input shapes for counting, and why the missing ones are missing.

    A model is traced once (the run is cached on the source). A TorchScript archive that cannot
    be run is still listed, conv form only, with a warning. With `layer_input_shape` (and
    `layer`) only that layer is counted, on that one-sample input, and nothing runs.
    """
    plan = ShapePlan()
    if layer_input_shape is not None:
        if layer is None:
            raise ConvtoolError(
                "`layer_input_shape` goes with layer='NAME' (that layer's input)",
                params=("layer_input_shape", "layer"),
            )
        one = src.select(layer)
        shape = layer_input_shape_of(src, one, None, layer_input_shape)
        plan.shapes[one.name] = padded_sample(one, shape)
        return plan
    if src.kind == "kernel":
        for conv in src.layers:
            if input_shape is None:
                example = ",".join([str(conv.spec.in_channels)] + ["32"] * conv.spec.ndim)
                plan.missing[conv.name] = (
                    f"no `input_shape`: only the conv form is counted (give one sample, e.g. "
                    f"input_shape={example})"
                )
            else:
                plan.shapes[conv.name] = layer_input_shape_of(src, conv, input_shape)
        return plan
    try:
        cap = resolve_shapes(src, input_shape)
    except ConvtoolError as exc:
        if "script" not in src.kind.lower():  # only TorchScript is worth listing unrun
            raise
        plan.warnings.append(f"{exc}; listing conv counts only")
        for conv in src.layers:
            plan.shapes[conv.name] = None
            plan.missing[conv.name] = f"the model could not be run: {exc}"
        return plan
    traced = src.traced_shape
    for conv in src.layers:
        if cap is not None and conv.name in cap.conflicts:
            seen = ", ".join(str(s) for s in cap.conflicts[conv.name])
            plan.shapes[conv.name] = None
            plan.missing[conv.name] = (
                f"called on several input shapes ({seen}): no unique LC/FC form"
            )
        elif conv.input_shape is not None and not conv.exact_spec:
            # asymmetric ONNX pads: counted as the unpadded conv on the pre-padded input
            plan.shapes[conv.name] = padded_sample(conv, conv.input_shape)
        elif conv.input_shape is None and conv.skipped is not None:
            plan.missing[conv.name] = f"{conv.skipped}: only the conv form is counted"
        elif conv.input_shape is None and src.kind == "onnx":
            plan.missing[conv.name] = (
                "ONNX shape inference gives no input shape: only the conv form is counted "
                "(give layer='NAME' with layer_input_shape=C_in,*spatial)"
            )
        elif conv.input_shape is None and traced is not None:
            plan.missing[conv.name] = (
                f"not called when the model runs on an input of shape {traced}: only the conv "
                f"form is counted"
            )
        elif conv.input_shape is None:
            plan.missing[conv.name] = (
                "no `input_shape`: only the conv form is counted (give the model's full "
                "example input, batch included, e.g. input_shape=1,3,224,224)"
            )
    if cap is not None and cap.functional:
        plan.notes.append(
            f"{len(cap.functional)} conv call(s) compute their weight from the input and are "
            f"not counted: {'; '.join(f.describe() for f in cap.functional[:4])}"
        )
    padded = [conv.name for conv in src.layers if not conv.exact_spec]
    if padded:
        plan.notes.append(
            f"{', '.join(padded[:6])}: asymmetric pads; LC/FC counted on the zero-pre-padded "
            f"input (the exact FC matrix drops those columns)"
        )
    return plan


layer_input_shape_of = layer_input_shape  # count_shapes' own parameter shadows the name


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
    call: str = "module"  # 'module', 'functional', 'script' or 'onnx' (see ConvLayer.call)
    pads: tuple[tuple[int, int], ...] | None = None  # asymmetric (ONNX) pads: (begin, end)
    output_crop: tuple[tuple[int, int], ...] | None = None
    skipped: str | None = None

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
            output_shape=layer_output_shape(layer, shape) if shape is not None else None,
            output_padding=tuple(spec.output_padding) if spec.transposed else None,
            call=layer.call,
            pads=_pairs(layer.pre_pad),
            output_crop=_pairs(layer.post_crop),
            skipped=layer.skipped,
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
        out["call"] = self.call
        if self.pads is not None:
            out["padding"] = [list(pair) for pair in self.pads]
        if self.output_crop is not None:
            out["output_crop"] = [list(pair) for pair in self.output_crop]
        if self.skipped is not None:
            out["skipped"] = self.skipped
        return out


def _pairs(pairs: Sequence[Sequence[int]] | None) -> tuple[tuple[int, int], ...] | None:
    return None if pairs is None else tuple((int(a), int(b)) for a, b in pairs)


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
        notes += [f"left as it is: {f.describe()}" for f in cap.functional]
        notes += [
            f"conv {n!r} is called on several input shapes: {', '.join(map(str, seen))}"
            for n, seen in cap.conflicts.items()
        ]
    if src.is_model and src.traced_shape is not None and src.kind != "onnx":
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
