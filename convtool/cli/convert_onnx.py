"""`convtool convert ... -o OUT.onnx | OUT.nnet [--fold]`: the ONNX and NNet outputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import typer

from convtool.errors import ConvtoolError
from convtool.render.common import emit_json

ONNX_SUFFIXES = (".onnx", ".nnet")


def check_request(
    output: Path, target: str, sparse: bool, fold: bool, opset: int | None, bounds: str | None
) -> tuple[float, float] | None:
    """Every refusal about the flags, before anything is loaded; the parsed input bounds."""
    from convtool.io.model_files import MODEL_FORMATS

    suffix = output.suffix.lower()
    if suffix not in ONNX_SUFFIXES and suffix not in MODEL_FORMATS:
        raise ConvtoolError(
            f"cannot tell the output format of {str(output)!r}; use .pt2 (torch.export program, "
            f"runs without convtool), .pt or .safetensors (converted state_dict), .onnx (ONNX) "
            f"or .nnet (folded network, NNet text format)"
        )
    if suffix not in ONNX_SUFFIXES:
        if fold:
            raise ConvtoolError("--fold writes a folded network: use -o NAME.onnx or NAME.nnet")
        if opset is not None:
            raise ConvtoolError("--opset applies to .onnx outputs")
        if bounds is not None:
            raise ConvtoolError("--input-bounds applies to .nnet outputs")
        return None
    if (fold or suffix == ".nnet") and target != "fc":
        raise ConvtoolError("--fold (and .nnet) folds the network into FC layers: use --to fc")
    if suffix == ".nnet":
        if sparse:
            raise ConvtoolError(
                "the NNet format stores dense matrices: drop --sparse, or write "
                ".onnx with --fold --sparse"
            )
        if opset is not None:
            raise ConvtoolError("--opset applies to .onnx outputs, not .nnet")
    elif bounds is not None:
        raise ConvtoolError("--input-bounds applies to .nnet outputs")
    if opset is not None and not 16 <= opset <= 23:
        raise ConvtoolError(f"--opset must be between 16 and 23, got {opset}")
    from convtool.export.torch_onnx import require_onnx

    require_onnx()
    if bounds is None:
        return None
    try:
        lo, hi = (float(v) for v in bounds.split(","))
    except ValueError:
        raise ConvtoolError(f"--input-bounds must be LO,HI, e.g. 0,1, got {bounds!r}") from None
    if not lo < hi:
        raise ConvtoolError(f"--input-bounds needs LO < HI, got {bounds!r}")
    return lo, hi


def convert_onnx_output(
    *,
    source: Path,
    source_kind: str,
    model: Any,
    example: tuple[int, ...] | None,
    target: str,
    sparse: bool,
    fold: bool,
    layers: str | None,
    output: Path,
    opset: int | None,
    bounds: tuple[float, float] | None,
    force: bool,
    inputs: list[Path],
    memory_limit: int | None,
    json_out: bool,
) -> None:
    """Convert or fold, write atomically, print the summary. `model` may be an ONNX proto."""
    from convtool.export import fold_onnx, folded_to_onnx, rewrite_onnx_convs
    from convtool.export.pipeline import fold_model, model_to_onnx
    from convtool.export.torch_onnx import DEFAULT_OPSET
    from convtool.io.writers import atomic_outputs
    from convtool.resources import check_disk

    started = time.perf_counter()
    nnet = output.suffix.lower() == ".nnet"
    fold = fold or nnet
    is_proto = not isinstance(model, torch.nn.Module)
    version = opset or DEFAULT_OPSET
    result: dict[str, Any] = {
        "source": str(source),
        "source_kind": source_kind,
        "to": target,
        "sparse": sparse,
        "fold": fold,
        "output": str(output),
    }
    if fold:
        net = (
            fold_onnx(model, sparse=sparse, memory_limit=memory_limit, for_onnx=not nnet)
            if is_proto
            else fold_model(
                model,
                example or (),
                sparse=sparse,
                opset=version,
                memory_limit=memory_limit,
                for_onnx=not nnet,
            )
        )
        from convtool.export.fold import layer_sizes

        result["layer_sizes"] = layer_sizes(net)
        if nnet:
            if net.layers[-1].relu:
                raise ConvtoolError(
                    "the network ends with a ReLU, which the NNet format cannot "
                    "hold (its last layer is affine); write .onnx instead"
                )
            from convtool.io.nnet import nnet_bytes, write_nnet

            check_disk(output, nnet_bytes(result["layer_sizes"]), "the NNet file", "free space")
            lo, hi = bounds if bounds is not None else (None, None)
            with atomic_outputs([output], force=force, inputs=inputs) as temps:
                write_nnet(
                    temps[0],
                    [np_dense(layer.weight) for layer in net.layers],
                    [layer.bias for layer in net.layers],
                    input_min=lo,
                    input_max=hi,
                    header=[
                        f"folded by convtool from {source.name}",
                        f"input shape {','.join(map(str, net.input_shape))} (flattened in C order)",
                    ],
                )
            result["format"] = "NNet"
            _finish(result, output, started, json_out)
            return
        proto = folded_to_onnx(net, opset=version)
    elif is_proto:
        proto, result["layers"] = rewrite_onnx_convs(
            model, target, sparse, layers=layers, memory_limit=memory_limit
        )
    else:
        proto, result["layers"] = model_to_onnx(
            model,
            example or (),
            to=target,
            sparse=sparse,
            layers=layers,
            opset=version,
            memory_limit=memory_limit,
        )
    from convtool.io.onnx_files import write_onnx

    check_disk(output, proto.ByteSize(), "the ONNX model", "free space")
    result["ops"] = sorted({n.op_type for n in proto.graph.node})
    with atomic_outputs([output], force=force, inputs=inputs) as temps:
        write_onnx(temps[0], proto)
    result["format"] = "ONNX"
    _finish(result, output, started, json_out)


def np_dense(weight: Any) -> Any:
    return weight if not hasattr(weight, "toarray") else weight.toarray()


def _finish(result: dict[str, Any], output: Path, started: float, json_out: bool) -> None:
    result["bytes_written"] = output.stat().st_size
    result["seconds"] = time.perf_counter() - started
    if json_out:
        emit_json(result)
        return
    what = "folded" if result["fold"] else f"{result['to']}{' sparse' if result['sparse'] else ''}"
    detail = (
        f"layer sizes {' -> '.join(map(str, result['layer_sizes']))}"
        if result["fold"]
        else f"{len(result.get('layers', []))} conv(s) rewritten"
    )
    ops = f"; ops: {', '.join(result['ops'])}" if "ops" in result else ""
    typer.echo(
        f"{result['source']} -> {result['output']} ({result['format']}, {what}): {detail}{ops}; "
        f"wrote {result['bytes_written']:,} bytes in {result['seconds']:.2f} s"
    )
