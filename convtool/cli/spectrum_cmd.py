"""`convtool spectrum`: singular values of conv layers, and a Lipschitz bound for the model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convtool.cli import options as opt
from convtool.cli.app import app
from convtool.cli.flags import cli_message
from convtool.cli.progress import progress
from convtool.describe import chosen_layers, layers_with_shapes
from convtool.errors import ConvtoolError
from convtool.io.writers import atomic_outputs, check_target
from convtool.operators import METHODS, SpectrumReport, layer_spectrum
from convtool.render.spectrum import render_spectrum, spectrum_json
from convtool.source import check_finite

LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Shell globs (comma-separated) of the conv layers, e.g. 'features.*,conv1'. "
        "Default: all.",
    ),
]
KOpt = Annotated[int, typer.Option("--k", "-k", help="How many singular values per layer.")]
SmallestOpt = Annotated[
    bool,
    typer.Option("--smallest", help="Also compute the k smallest values and the condition number."),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="auto (fft for circular stride-1, dense when small, else Lanczos, or a bound when "
        "too costly), fft, dense, svds or bound.",
    ),
]
TolOpt = Annotated[float, typer.Option("--tol", help="Relative accuracy of the Lanczos values.")]
PlotOpt = Annotated[
    Path | None,
    typer.Option("--plot", help="Write a PNG of each layer's singular values (needs matplotlib)."),
]


@app.command("spectrum", no_args_is_help=True)
def spectrum_command(
    source: opt.SourceArg,
    input_shape: opt.InputShapeOpt = None,
    layers: LayersOpt = None,
    k: KOpt = 5,
    smallest: SmallestOpt = False,
    method: MethodOpt = "auto",
    tol: TolOpt = 1e-6,
    plot: PlotOpt = None,
    force: opt.ForceOpt = False,
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
    allow_nonfinite: opt.AllowNonfiniteOpt = False,
) -> None:
    """Singular values of each conv layer's matrix T (exact: FFT, dense SVD or Lanczos; or an
    upper bound when exact is too costly), and a Lipschitz upper bound for the chain of layers.

    Examples: convtool spectrum kernel.npy --input-shape 3,32,32 --padding 1 --smallest;
    convtool spectrum weights.pt --model mypkg.nets:make_model --input-shape 1,3,64,64 --json
    """
    if layer is not None and layers is not None:
        raise ConvtoolError(
            f"--layer {layer!r} and --layers {layers!r} both given; use --layers for several"
        )
    if k < 1:
        raise ConvtoolError(f"--k must be a positive integer, got {k}")
    if method not in METHODS:
        raise ConvtoolError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < tol < 1:
        raise ConvtoolError(f"--tol must be in (0, 1), got {tol}")
    if smallest and method == "bound":
        raise ConvtoolError("--method bound bounds sigma_max only; drop --smallest")
    inputs = [p for p in (source, bias) if p is not None]
    if plot is not None:
        from convtool.render.plots import require_matplotlib

        require_matplotlib()  # before any work: a missing extra costs nothing
        check_target(plot, force, inputs)
    src = opt.open_source(
        source,
        layer,
        bias,
        model,
        model_kwargs,
        allow_pickle,
        opt.conv_flags(stride, padding, dilation, groups, padding_mode, transposed, output_padding),
    )
    chosen = chosen_layers(src, layer, layers)
    if not allow_nonfinite:
        for conv in chosen:
            check_finite(conv)
    # spectrum() takes one conv; an ONNX node with asymmetric pads pads or crops around it
    uneven = [c for c in chosen if not c.exact_spec]
    notes = [
        f"not analysed: {c.name!r} pads or crops unevenly around its conv (an ONNX node with "
        f"asymmetric pads); its singular values are not those of one conv"
        for c in uneven
    ]
    even = [c for c in chosen if c.exact_spec]
    if not even:
        raise ConvtoolError(f"no conv layer could be analysed: {'; '.join(notes)}")
    shape = None if input_shape is None else opt.parse_shape(input_shape, "--input-shape")
    pairs, shape_notes = layers_with_shapes(src, even, shape, cli_message, verb="analysed")
    notes += shape_notes
    results = []
    with progress(len(pairs), "singular values", not json_out) as advance:
        for conv, shape in pairs:
            results.append(
                layer_spectrum(
                    conv.name,
                    conv.spec,
                    conv.weight,
                    shape,
                    k,
                    smallest=smallest,
                    method=method,
                    tol=tol,
                )
            )
            advance(1)
    report = SpectrumReport(results, notes)
    if plot is not None:
        from convtool.render.plots import plot_spectra

        with atomic_outputs([plot], force=force, inputs=inputs) as temps:
            plot_spectra(temps[0], [(r.name, r.largest) for r in results])
    if json_out:
        spectrum_json(report, str(source))
    else:
        render_spectrum(report, smallest)
        if plot is not None:
            typer.echo(f"wrote {plot}", err=True)
