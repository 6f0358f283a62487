"""`convtool verify`: numerical proof that the Toeplitz, LC and FC forms equal the conv."""

from __future__ import annotations

from typing import Annotated

import typer

from convtool.cli import options as opt
from convtool.cli import shapes as sh
from convtool.cli.app import EXIT_MISMATCH, EXIT_OK, app
from convtool.cli.flags import cli_message
from convtool.cli.progress import progress
from convtool.describe import chosen_layers, layers_with_shapes
from convtool.errors import ConvtoolError
from convtool.forms import Target
from convtool.render.common import emit_json
from convtool.render.verify import render_verify_report
from convtool.source import Source
from convtool.verification import (
    FormCheck,
    form_names,
    model_form_names,
    parse_dtype,
    resolve_tolerance,
    verify_layers,
)

ToOpt = Annotated[
    Target,
    typer.Option(
        "--to",
        case_sensitive=False,
        help="Forms to check: toeplitz (T @ x + b, dense and sparse), lc, fc (dense and "
        "sparse), or all.",
    ),
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="float64 (rounding-level proof) or float32.")
]
TrialsOpt = Annotated[
    int, typer.Option("--trials", help="Seeded random inputs, besides an all-ones and a zero one.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")]
RtolOpt = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        help="Relative tolerance (with --atol). Default: each output element against the "
        "rounding-error bound of its dot product (length and sum |w||x|), float64 reference.",
    ),
]
AtolOpt = Annotated[
    float | None,
    typer.Option(
        "--atol",
        help="Absolute tolerance (with --rtol). Default: the rounding-error bound (see --rtol).",
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Fail (exit 1) when any check was skipped or only sampled for lack of memory.",
    ),
]
VerifyMaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory one check may use, e.g. 8G; larger forms are skipped or sampled (default: "
        "the machine's total memory, so every run checks the same things).",
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Shell globs (comma-separated) of the conv layers to check and to convert end to "
        "end, e.g. 'features.*,conv1'. Default: all.",
    ),
]


def _example_shape(src: Source, input_shape: str | None) -> tuple[int, ...] | None:
    if input_shape is not None:
        return opt.parse_shape(input_shape)
    return src.traced_shape or src.example_shape


@app.command("verify", no_args_is_help=True)
def verify_command(
    source: opt.SourceArg,
    input_shape: opt.InputShapeOpt = None,
    to: ToOpt = Target.ALL,
    dtype: DtypeOpt = "float64",
    trials: TrialsOpt = 3,
    seed: SeedOpt = 0,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    layers: LayersOpt = None,
    json_out: opt.JsonOpt = False,
    layer: opt.LayerOpt = None,
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
    max_memory: VerifyMaxMemoryOpt = None,
    strict: StrictOpt = False,
    forward_kwargs: opt.ForwardKwargsOpt = None,
    layer_input_shape: opt.LayerInputShapeOpt = None,
) -> None:
    """Check each conv layer against its Toeplitz product, LC and FC forms (and a model end to
    end) on seeded random, all-ones and zero inputs. Exit 0 if all agree, 1 on any mismatch
    (with --strict, also on any check skipped for memory), 2 if nothing could be compared.

    The reference is PyTorch's own conv in float64; each float32/float64 form is judged against
    the rounding-error bound of its dot products unless --rtol/--atol are given. NaN/inf
    weights are not refused: they fail the check.

    Examples: convtool verify kernel.npy --input-shape 3,32,32 --stride 2 --padding 1;
    convtool verify weights.pt --model mypkg.nets:make_model --input-shape 1,3,64,64 --json
    """
    if layer is not None and layers is not None:
        raise ConvtoolError(
            f"--layer {layer!r} and --layers {layers!r} both given; use --layers for several"
        )
    torch_dtype = parse_dtype(dtype)
    resolve_tolerance(torch_dtype, rtol, atol)  # a bad tolerance fails before any loading
    if trials < 0 or seed < 0:
        raise ConvtoolError(f"--trials and --seed must be non-negative, got {trials} and {seed}")
    memory_limit = opt.max_memory(max_memory)
    src = opt.open_source(
        source,
        layer,
        bias,
        model,
        model_kwargs,
        allow_pickle,
        opt.conv_flags(stride, padding, dilation, groups, padding_mode, transposed, output_padding),
        forward_kwargs,
    )
    if layer_input_shape is not None:
        if layer is None:
            raise ConvtoolError("--layer-input-shape goes with --layer NAME (that layer's input)")
        one = src.select(layer)
        pairs = [(one, sh.layer_input_shape(src, one, None, layer_input_shape))]
        notes: list[str] = ["the model was not run: --layer-input-shape checks the layer alone"]
        example = None
    else:
        if src.is_model and input_shape is not None:
            sh.resolve_shapes(src, input_shape)
        chosen = chosen_layers(src, layer, layers)
        shape = None if input_shape is None else opt.parse_shape(input_shape)
        pairs, notes = layers_with_shapes(src, chosen, shape, cli_message)
        example = _example_shape(src, input_shape) if src.model is not None else None
    if src.kind == "onnx":
        from convtool.onnx_check import verify_onnx_layers

        report = verify_onnx_layers(
            pairs, opset=src.onnx.opset, dtype=torch_dtype, trials=trials, seed=seed, rtol=rtol,
            atol=atol,
        )  # fmt: skip
        report.notes[:0] = notes
        if json_out:
            emit_json({"source": str(source), **report.to_dict()})
        else:
            render_verify_report(report, str(source))
        raise typer.Exit(EXIT_OK if report.passed else EXIT_MISMATCH)
    total = len(pairs) * len(form_names(to)) + (len(model_form_names(to)) if example else 0)
    with progress(total, "verifying", not json_out) as step:

        def advance(check: FormCheck) -> None:
            step(1)

        report = verify_layers(
            pairs,
            model=src.model,
            example_shape=example,
            to=to,
            dtype=torch_dtype,
            trials=trials,
            seed=seed,
            rtol=rtol,
            atol=atol,
            max_memory=memory_limit,
            strict=strict,
            advance=advance,
            forward_kwargs=src.forward_kwargs,
        )
    report.notes[:0] = notes
    if src.model is not None and example is None:
        report.notes.append("no end-to-end comparison: give the example input with --input-shape")
    if json_out:
        emit_json({"source": str(source), **report.to_dict()})
    else:
        render_verify_report(report, str(source))
    raise typer.Exit(EXIT_OK if report.passed else EXIT_MISMATCH)
