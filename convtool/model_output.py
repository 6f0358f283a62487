"""Converting a model SOURCE and writing the result (.pt2 program or .pt / .safetensors
state_dict with the metadata :func:`convtool.load_converted` reads): what `convtool convert`
calls for non-ONNX outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from convtool.describe import ConvertResult
from convtool.errors import ConvtoolError
from convtool.io import model_files as mfiles
from convtool.io.writers import atomic_outputs
from convtool.models import convert_with_report, export_converted, stored_size
from convtool.resources import check_disk
from convtool.source import Source
from convtool.spec import build_conv

__all__ = ["model_and_input", "write_converted"]


def model_and_input(src: Source, input_shape: Sequence[int] | None) -> tuple[Any, tuple[int, ...]]:
    """The module to convert and its full example input shape `(N, C_in, *spatial)`.

    A kernel source becomes its `nn.Conv*d`; `input_shape` may then be one sample
    `(C_in, *spatial)` (a batch of 1 is added). A model source needs `input_shape` unless it
    knows the shape it was exported with.
    """
    if src.kind == "kernel":
        layer = src.layers[0]
        if input_shape is None:
            dims = ",".join(["32"] * layer.spec.ndim)
            raise ConvtoolError(
                f"`input_shape` is required: one sample of the kernel's input, e.g. "
                f"{layer.spec.in_channels},{dims}",
                params=("input_shape",),
            )
        shape = tuple(input_shape)
        sample = layer.spec.checked_sample(shape)
        return build_conv(layer.spec, layer.weight, layer.bias), (
            shape if len(shape) == len(sample) + 1 else (1, *sample)
        )
    if input_shape is not None:
        return src.model, tuple(input_shape)
    if src.example_shape is not None:
        return src.model, src.example_shape
    raise ConvtoolError(
        "`input_shape` is required: the model's full example input, batch included, e.g. "
        "1,3,224,224",
        params=("input_shape",),
    )


def write_converted(
    src: Source,
    module: Any,
    example: tuple[int, ...],
    *,
    to: str,
    sparse: bool,
    layers: str | None,
    output: Path,
    fmt: str,
    force: bool,
    inputs: Sequence[Path],
    memory_limit: int | None,
    version: str,
    advance: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Convert `module` (in place: the loaded model is ours), then write it atomically.

    Args:
        src: the loaded source (its path, kind and forward keyword arguments).
        module: the model, or the kernel's conv (see :func:`model_and_input`).
        example: its full example input shape.
        to, sparse, layers, memory_limit: as for :func:`convtool.models.convert_with_report`.
        output: the file; `fmt` its format (:func:`convtool.io.model_files.model_format`).
        force, inputs: overwrite rules (see :func:`convtool.io.writers.atomic_outputs`).
        version: the writing convtool's version (`convtool.__version__`), for the metadata.
        advance: called once per converted layer.
        warn: receives each warning of the report (what was left as a conv, ...).
    """
    source = src.path
    started = time.perf_counter()
    converted, report = convert_with_report(
        module,
        example,
        to=to,
        sparse=sparse,
        layers=layers,
        memory_limit=memory_limit,
        advance=advance,
        inplace=True,  # the loaded model is ours: no second copy of its weights
        forward_kwargs=src.forward_kwargs,
        # refused before any form is built when the estimated forms alone cannot fit on disk
        before_build=lambda nbytes: check_disk(
            output,
            nbytes,
            "the converted model",
            "convert fewer layers with `layers`",
            params=("layers",),
        ),
    )
    for line in report.warnings():
        if warn is not None:
            warn(line)
    if not report.layers:
        raise ConvtoolError(f"no conv layer of {str(source)!r} could be converted; nothing written")
    check_disk(
        output, stored_size(converted)[1], "the converted model",
        "convert fewer layers with `layers`", params=("layers",),
    )  # fmt: skip
    if fmt == "export":
        program = export_converted(converted, example, src.forward_kwargs)
        with atomic_outputs([output], force=force, inputs=list(inputs)) as temps:
            mfiles.write_program(temps[0], program)
    else:
        meta = mfiles.metadata(report.to_dict(), source.name, src.kind, version=version)
        with atomic_outputs([output], force=force, inputs=list(inputs)) as temps:
            mfiles.write_state_dict(temps[0], converted.state_dict(), meta)
    return ConvertResult(
        report=report,
        source=str(source),
        source_kind=src.kind,
        output=str(output),
        format=fmt,
        bytes_written=output.stat().st_size,
        seconds=time.perf_counter() - started,
    )
