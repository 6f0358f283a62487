"""Options shared by the subcommands, and parsers for their comma-separated values."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from torch import Tensor

from convtool.errors import ConvtoolError
from convtool.resources import parse_size
from convtool.source import ConvFlags, Source, SourceOptions, load_source

KERNEL_PANEL = "Kernel flags (SOURCE is a raw kernel file)"
MODEL_PANEL = "Checkpoint (SOURCE is a model file)"

SourceArg = Annotated[
    Path,
    typer.Argument(
        help="Kernel file (.npy .npz .pt .pth .bin .ckpt .safetensors) or model (state_dict "
        "with --model, TorchScript archive, .pt2 torch.export program, .onnx).",
        show_default=False,
    ),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        "-i",
        help="Comma-separated. Kernel: one sample C,H,W (a leading batch is accepted). "
        "Model: the full example input, e.g. 1,3,224,224.",
    ),
]
LayerOpt = Annotated[
    str | None, typer.Option("--layer", help="Name of the conv layer to use (e.g. features.0).")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
AllowNonfiniteOpt = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Accept NaN/inf weights instead of refusing.")
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Largest allocation allowed, e.g. 8G (default: the machine's available memory).",
    ),
]
StrideOpt = Annotated[
    str,
    typer.Option("--stride", help="int or comma-separated per dim.", rich_help_panel=KERNEL_PANEL),
]
PaddingOpt = Annotated[
    str,
    typer.Option(
        "--padding",
        help="int, comma-separated per dim, 'same' or 'valid'.",
        rich_help_panel=KERNEL_PANEL,
    ),
]
DilationOpt = Annotated[
    str, typer.Option("--dilation", help="int or comma-separated.", rich_help_panel=KERNEL_PANEL)
]
GroupsOpt = Annotated[int, typer.Option("--groups", rich_help_panel=KERNEL_PANEL)]
PaddingModeOpt = Annotated[
    str,
    typer.Option(
        "--padding-mode",
        help="zeros, reflect, replicate or circular.",
        rich_help_panel=KERNEL_PANEL,
    ),
]
TransposedOpt = Annotated[
    bool,
    typer.Option(
        "--transposed",
        help="The kernel is a ConvTranspose weight (C_in, C_out/groups, *k).",
        rich_help_panel=KERNEL_PANEL,
    ),
]
OutputPaddingOpt = Annotated[
    str,
    typer.Option("--output-padding", help="Transposed only.", rich_help_panel=KERNEL_PANEL),
]
BiasOpt = Annotated[
    Path | None,
    typer.Option("--bias", help="File holding the bias vector.", rich_help_panel=KERNEL_PANEL),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="MODULE:CALLABLE that builds the architecture for a state_dict (like uvicorn).",
        rich_help_panel=MODEL_PANEL,
    ),
]
ModelKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--model-kwargs",
        help="JSON object of keyword arguments for --model.",
        rich_help_panel=MODEL_PANEL,
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Load a fully pickled model. UNSAFE: unpickling can run arbitrary code; only for "
        "files you trust.",
        rich_help_panel=MODEL_PANEL,
    ),
]

ForwardKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--forward-kwargs",
        help="JSON object of further keyword arguments for the model's forward, passed to "
        "every run, e.g. '{\"sr\": 16000}'.",
        rich_help_panel=MODEL_PANEL,
    ),
]
LayerInputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--layer-input-shape",
        help="With --layer: that layer's own one-sample input C_in,*spatial; the model is not run.",
        rich_help_panel=MODEL_PANEL,
    ),
]

_INT = re.compile(r"[+-]?\d+")


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """'3,7,9' (also '(3, 7, 9)' or '3 7 9') -> (3, 7, 9)."""
    parts = [p for p in re.split(r"[,\s]+", text.strip().strip("()[]").strip()) if p]
    if not parts or not all(_INT.fullmatch(p) for p in parts):
        raise ConvtoolError(f"{option} must be comma-separated integers like 3,32,32, got {text!r}")
    return tuple(int(p) for p in parts)


def parse_shape(text: str, option: str = "--input-shape") -> tuple[int, ...]:
    """A shape: positive ints."""
    shape = parse_ints(text, option)
    if any(s <= 0 for s in shape):
        raise ConvtoolError(f"{option} sizes must be positive, got {text!r}")
    return shape


def _per_dim(text: str, option: str) -> int | tuple[int, ...]:
    values = parse_ints(text, option)
    return values[0] if len(values) == 1 else values


def conv_flags(
    stride: str,
    padding: str,
    dilation: str,
    groups: int,
    padding_mode: str,
    transposed: bool,
    output_padding: str,
) -> ConvFlags:
    """ConvFlags from the raw option strings (validated later against the kernel by ConvSpec)."""
    pad: int | tuple[int, ...] | str
    pad = (
        padding.strip().lower()
        if padding.strip().lower() in ("same", "valid")
        else (_per_dim(padding, "--padding"))
    )
    return ConvFlags(
        stride=_per_dim(stride, "--stride"),
        padding=pad,
        dilation=_per_dim(dilation, "--dilation"),
        groups=groups,
        padding_mode=padding_mode.strip().lower(),
        transposed=transposed,
        output_padding=_per_dim(output_padding, "--output-padding"),
    )


def parse_forward_kwargs(text: str | None) -> dict[str, Any] | None:
    """`--forward-kwargs` JSON -> a dict (lists of numbers stay lists; the model gets them)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConvtoolError(
            f"--forward-kwargs must be a JSON object like '{{\"sr\": 16000}}', got {text!r} "
            f"({exc.msg})"
        ) from None
    if not isinstance(value, dict):
        raise ConvtoolError(
            f"--forward-kwargs must be a JSON object like '{{\"sr\": 16000}}', got {text!r}"
        )
    return value


def open_source(
    source: Path,
    layer: str | None,
    bias: Path | None,
    model: str | None,
    model_kwargs: str | None,
    allow_pickle: bool,
    flags: ConvFlags,
    forward_kwargs: str | None = None,
) -> Source:
    """Load SOURCE with the shared options every subcommand declares."""
    options = SourceOptions(
        flags=flags,
        layer=layer,
        bias=bias,
        model=model,
        model_kwargs=model_kwargs,
        allow_pickle=allow_pickle,
        forward_kwargs=parse_forward_kwargs(forward_kwargs),
    )
    return load_source(source, options)


def max_memory(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


RoiOpt = Annotated[
    str | None,
    typer.Option(
        "--roi",
        help="Only the rows of a region of output positions: a box 'h0:h1,w0:w1' (one "
        "start:stop range per spatial axis of the OUTPUT, Python-style) or a boolean .npy mask "
        "of the output's spatial shape. For a transposed conv: its own output positions.",
    ),
]


def roi_mask(text: str, out_spatial: tuple[int, ...]) -> Tensor:
    """The --roi value as a boolean mask over the output positions (refused before any work)."""
    from convtool.region import parse_box, region_positions

    if text.strip().lower().endswith(".npy"):
        path = Path(text.strip())
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ConvtoolError(f"--roi mask file {str(path)!r} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ConvtoolError(
                f"--roi mask file {str(path)!r} is not a readable .npy: {exc}"
            ) from None
        if array.dtype != np.bool_:
            raise ConvtoolError(
                f"--roi mask file {str(path)!r} holds {array.dtype}, not bool; save a boolean "
                f"array of shape {out_spatial}"
            )
        mask = torch.from_numpy(np.ascontiguousarray(array))
    else:
        try:
            mask = parse_box(text, out_spatial)
        except ConvtoolError as exc:
            raise ConvtoolError(f"--roi: {exc}") from None
    try:
        region_positions(mask, out_spatial)
    except ConvtoolError as exc:
        raise ConvtoolError(f"--roi: {exc}") from None
    return mask
