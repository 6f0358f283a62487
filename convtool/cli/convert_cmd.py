"""`convtool convert`: replace a model's convs by their LC or FC forms and write the result."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from convtool import __version__
from convtool.cli import options as opt
from convtool.cli.app import app
from convtool.cli.convert_onnx import ONNX_SUFFIXES, check_request, convert_onnx_output
from convtool.cli.flags import cli_text
from convtool.cli.progress import progress
from convtool.describe import ConvertResult
from convtool.errors import ConvtoolError
from convtool.forms import ModelTarget
from convtool.io import model_files as mfiles
from convtool.io.writers import check_target
from convtool.model_output import model_and_input, write_converted
from convtool.render.common import emit_json
from convtool.render.convert import render_convert
from convtool.source import Source, check_finite

ToOpt = Annotated[
    ModelTarget,
    typer.Option(
        "--to",
        case_sensitive=False,
        help="lc: locally connected (one kernel copy per output position); fc: fully "
        "connected (the exact matrix T).",
        show_default=False,
    ),
]
SparseOpt = Annotated[
    bool, typer.Option("--sparse", help="With --to fc: keep each matrix sparse (CSR/COO).")
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Which convs to convert: names or globs, comma-separated, e.g. 'features.*' or "
        "'conv1,conv2' (default: all).",
    ),
]
OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help=".pt2: torch.export program that runs without convtool; .pt / "
        ".safetensors: the converted state_dict (reload with convtool.load_converted); .onnx: "
        "ONNX with the LC/FC forms as standard ops (dynamic batch); .nnet: the folded network "
        "in NNet format.",
        show_default=False,
    ),
]
FoldOpt = Annotated[
    bool,
    typer.Option(
        "--fold",
        help="With --to fc and -o .onnx/.nnet: fold every linear stretch between ReLUs (convs, "
        "BatchNorm, average pooling, pads, reshapes, Linear) into one affine layer.",
    ),
]
OpsetOpt = Annotated[
    int | None, typer.Option("--opset", help="ONNX opset of a .onnx output (default 18).")
]
InputBoundsOpt = Annotated[
    str | None,
    typer.Option(
        "--input-bounds",
        help="LO,HI: the input domain written into a .nnet file (default: the float32 range).",
    ),
]


def _model_and_input(src: Source, input_shape: str | None) -> tuple[Any, tuple[int, ...]]:
    """:func:`convtool.model_output.model_and_input` with the option's text."""
    return model_and_input(src, None if input_shape is None else opt.parse_shape(input_shape))


@app.command("convert", no_args_is_help=True)
def convert_command(
    source: opt.SourceArg,
    to: ToOpt,
    output: OutputOpt,
    input_shape: opt.InputShapeOpt = None,
    sparse: SparseOpt = False,
    layers: LayersOpt = None,
    force: opt.ForceOpt = False,
    json_out: opt.JsonOpt = False,
    stride: opt.StrideOpt = "1",
    padding: opt.PaddingOpt = "0",
    dilation: opt.DilationOpt = "1",
    groups: opt.GroupsOpt = 1,
    padding_mode: opt.PaddingModeOpt = "zeros",
    transposed: opt.TransposedOpt = False,
    output_padding: opt.OutputPaddingOpt = "0",
    bias: opt.BiasOpt = None,
    model: opt.ModelOpt = None,
    model_kwargs: opt.ModelKwargsOpt = None,
    allow_pickle: opt.AllowPickleOpt = False,
    allow_nonfinite: opt.AllowNonfiniteOpt = False,
    max_memory: opt.MaxMemoryOpt = None,
    forward_kwargs: opt.ForwardKwargsOpt = None,
    fold: FoldOpt = False,
    opset: OpsetOpt = None,
    input_bounds: InputBoundsOpt = None,
) -> None:
    """Replace every (or every --layers) conv of a model by its LC or FC form and write it.

    The converted model computes the same outputs as the original, for inputs of the
    --input-shape it was converted for.

    Example: convtool convert weights.pt --model mypkg.nets:make_net --input-shape 1,3,32,32
    --to lc -o net_lc.pt2
    """
    target = to
    if sparse and target != ModelTarget.FC:
        raise ConvtoolError("--sparse applies to --to fc (an LC layer stores only its taps)")
    if source.suffix.lower() == ".onnx" and output.suffix.lower() not in ONNX_SUFFIXES:
        raise ConvtoolError(
            f"converting an ONNX model writes ONNX: use -o {output.with_suffix('.onnx').name}"
        )
    bounds = check_request(output, target, sparse, fold, opset, input_bounds)
    if output.suffix.lower() in ONNX_SUFFIXES:
        _onnx_output(**locals())
        return
    fmt = mfiles.model_format(output)
    inputs = [p for p in (source, bias) if p is not None]
    check_target(output, force, inputs)  # before any work: a refusal costs nothing
    memory_limit = opt.max_memory(max_memory)
    try:
        src = opt.open_source(
            source,
            None,
            bias,
            model,
            model_kwargs,
            allow_pickle,
            opt.conv_flags(
                stride, padding, dilation, groups, padding_mode, transposed, output_padding
            ),
            forward_kwargs,
        )
    except ConvtoolError as exc:
        if "several conv kernels" not in str(exc):
            raise
        raise ConvtoolError(
            f"{str(source)!r} holds several conv kernels; give the architecture with --model "
            f"MODULE:CALLABLE to convert the whole model (for one kernel's matrix: convtool "
            f"toeplitz {source.name} --layer NAME)"
        ) from None
    if src.kind == "torchscript":
        raise ConvtoolError(
            f"cannot convert the TorchScript archive {str(source)!r}: its convs run inside the "
            f"TorchScript interpreter; convert its torch.export program instead (torch.export."
            f"export(model, (x,)) then torch.export.save to .pt2) or its state_dict with --model "
            f"MODULE:CALLABLE, or write ONNX with -o NAME.onnx (inspect, count-params, toeplitz "
            f"and verify read it as it is)"
        )
    if not allow_nonfinite:
        for layer in src.layers:
            check_finite(layer)
    module, example = _model_and_input(src, input_shape)
    with warnings.catch_warnings():  # torch's beta notice for CSR is noise here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        result = _convert(
            src,
            module,
            example,
            target,
            sparse,
            layers,
            output,
            fmt,
            force,
            inputs,
            memory_limit,
            json_out,
        )
    if json_out:
        emit_json(result.to_dict())
    else:
        render_convert(result)


def _onnx_output(**kw: Any) -> None:
    """`convert` for .onnx / .nnet outputs (any source, .onnx included)."""
    source, output, force, bias = kw["source"], kw["output"], kw["force"], kw["bias"]
    if kw["forward_kwargs"] is not None:
        raise ConvtoolError(
            "--forward-kwargs does not go with an ONNX or NNet output: the exported graph takes "
            "one input; write .pt2 or .pt instead"
        )
    inputs = [p for p in (source, bias) if p is not None]
    check_target(output, force, inputs)
    memory_limit = opt.max_memory(kw["max_memory"])
    model: Any
    if source.suffix.lower() == ".onnx":
        from convtool.io.onnx_files import read_onnx

        model, example, kind = read_onnx(source), None, "onnx"
    else:
        src = opt.open_source(
            source,
            None,
            bias,
            kw["model"],
            kw["model_kwargs"],
            kw["allow_pickle"],
            opt.conv_flags(
                kw["stride"],
                kw["padding"],
                kw["dilation"],
                kw["groups"],
                kw["padding_mode"],
                kw["transposed"],
                kw["output_padding"],
            ),
        )
        if not kw["allow_nonfinite"]:
            for layer in src.layers:
                check_finite(layer)
        model, example = _model_and_input(src, kw["input_shape"])
        kind = src.kind
        if src.kind == "torchscript":  # the ONNX exporter takes programs, not scripts
            import torch

            from convtool.programs import export_mirror, script_to_program

            x = torch.zeros(example)
            model = export_mirror(script_to_program(model, x))[0]
    convert_onnx_output(
        source=source,
        source_kind=kind,
        model=model,
        example=example,
        target=str(kw["target"]),
        sparse=kw["sparse"],
        fold=kw["fold"],
        layers=kw["layers"],
        output=output,
        opset=kw["opset"],
        bounds=kw["bounds"],
        force=force,
        inputs=inputs,
        memory_limit=memory_limit,
        json_out=kw["json_out"],
    )


def _convert(
    src: Source,
    module: Any,
    example: tuple[int, ...],
    target: str,
    sparse: bool,
    layers: str | None,
    output: Path,
    fmt: str,
    force: bool,
    inputs: list[Path],
    memory_limit: int | None,
    quiet: bool,
) -> ConvertResult:
    """:func:`convtool.model_output.write_converted` with a progress bar; its warnings go to
    stderr once the bar is gone (and before any error it raises)."""
    warned: list[str] = []
    try:
        with progress(len(src.layers), f"converting to {target}", not quiet) as advance:
            return write_converted(
                src,
                module,
                example,
                to=target,
                sparse=sparse,
                layers=layers,
                output=output,
                fmt=fmt,
                force=force,
                inputs=inputs,
                memory_limit=memory_limit,
                version=__version__,
                advance=advance,
                warn=warned.append,
            )
    finally:
        for line in warned:
            typer.echo(f"convtool: warning: {cli_text(line)}", err=True)
