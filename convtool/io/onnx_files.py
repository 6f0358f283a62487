"""ONNX model files in and out (the `onnx` package reads and writes them; nothing is executed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convtool.errors import ConvtoolError


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConvtoolError(
            "reading or writing ONNX needs the onnx package: pip install 'torch-convtool[onnx]'"
        ) from None
    return onnx


def read_onnx(path: Path) -> Any:
    """An `onnx.ModelProto` from a file, read as every ONNX source is (external data only from
    the model's own folder, see :mod:`convtool.io.onnx_reader`), then checked by onnx.checker."""
    from convtool.io.onnx_reader import read_onnx as read_source

    onnx = _onnx()
    model = read_source(path)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvtoolError(f"cannot read {str(path)!r} as an ONNX model: {text[:200]}") from None
    return model


def write_onnx(path: Path, model: Any) -> None:
    """Check `model` with onnx.checker (full check: types and shapes) and save it to `path`."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # a bug in the writer, not the user's input
        text = str(exc).strip().splitlines()[0][:300]
        raise AssertionError(f"convtool wrote an invalid ONNX model: {text}") from None
    try:
        onnx.save_model(model, str(path))
    except OSError as exc:
        raise ConvtoolError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
