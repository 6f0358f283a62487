"""A PyTorch model as a plain ONNX graph (its convs still Conv nodes), batch left dynamic.

Why go through `torch.onnx.export` and then rewrite the Conv nodes, instead of emitting ONNX
for the converted PyTorch model: the exporter already covers every op around the convs
(pads, pooling, norms, heads, reshapes) and keeps each conv's weight under its module path, so
convtool only owns the conv forms, and an ONNX source goes through the very same rewrite.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from convtool.errors import ConvtoolError
from convtool.export.dynamic_batch import dynamic_batch_mirror, guard_free

DEFAULT_OPSET = 18  # ScatterND reduction='add' needs 16; onnxruntime >= 1.14 runs 18


def require_onnx() -> Any:
    """The `onnx` module, or a one-line refusal saying how to get it."""
    try:
        import onnx
    except ImportError:
        raise ConvtoolError(
            "writing ONNX needs the onnx package: pip install 'torch-convtool[onnx]'"
        ) from None
    return onnx


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """The exporter prints progress and deprecation notes; none of it is for our user."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(
    model: nn.Module | Any,
    example_shape: Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
) -> Any:
    """`model` as an `onnx.ModelProto` (eval mode), with a dynamic batch where it allows one.

    Args:
        model: an eager module, a GraphModule, or a torch.export ExportedProgram.
        example_shape: the full input `(N, C, *spatial)`.
        opset: ONNX opset to target (16 or later).

    Raises:
        ConvtoolError: when the exporter cannot export the model.
    """
    require_onnx()
    if not 16 <= opset <= 23:
        raise ConvtoolError(f"opset must be between 16 and 23, got {opset}")
    shape = tuple(int(s) for s in example_shape)
    if isinstance(model, nn.Module):
        with contextlib.suppress(NotImplementedError):
            model.eval()
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = param.dtype if param is not None else torch.float32
    else:
        dtype = torch.float32
    x = torch.zeros((max(2, shape[0]), *shape[1:]), dtype=dtype)
    errors = []
    with _silenced(), torch.no_grad():
        # (what to export, its example args, dynamic shapes)
        attempts: list[tuple[Any, tuple[Any, ...], Any]]
        free = guard_free(model) if isinstance(model, nn.Module) else None
        if not isinstance(model, nn.Module):  # an ExportedProgram: as it is
            attempts = [(model, (), None)]
            free = model.module(check_guards=False)
            reference = model.module()
        elif free is not None:  # a .pt2 mirror: its guards fix the batch
            attempts = [(model, (x[: shape[0]],), None)]
            reference = model
        else:
            attempts = [(model, (x,), ({0: torch.export.Dim("batch")},))]
            attempts.append((model, (x[: shape[0]],), None))
        if free is not None:  # a fixed-batch program: re-exported with a dynamic batch if exact
            mirror = dynamic_batch_mirror(reference, free, shape)
            if mirror is not None:
                attempts.insert(0, (mirror, (), None))
        for target, args, dynamic in attempts:
            try:
                program = torch.onnx.export(
                    target,
                    args,
                    dynamo=True,
                    opset_version=opset,
                    dynamic_shapes=dynamic,
                    optimize=True,
                    verbose=False,
                )
                assert program is not None  # dynamo=True always returns the program
                return program.model_proto
            except Exception as exc:  # the dynamic try fails for models with a fixed batch
                errors.append(exc)
    text = str(errors[-1]).strip().splitlines()[0] if str(errors[-1]).strip() else ""
    raise ConvtoolError(
        f"torch.onnx.export could not export the model: {type(errors[-1]).__name__}: {text[:200]}"
    )
