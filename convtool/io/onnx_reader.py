"""Bytes -> ONNX ModelProto, with the `onnx` package alone (no code runs, nothing is executed).

External tensor data (weights in side files) is read only from the model's own folder: a
location that leaves it (an absolute path, `..`) is refused, since a crafted file could make
convtool read any file on the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convtool.errors import ConvtoolError
from convtool.io.tensors import read_bytes

__all__ = ["read_onnx"]


def _external_locations(model: Any) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors

    places = []
    for tensor in _get_all_tensors(model):
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            for entry in tensor.external_data:
                if entry.key == "location":
                    places.append(entry.value)
    return places


def read_onnx(path: Path) -> Any:
    """The `onnx.ModelProto` in `path`, its external data loaded from its folder.

    Raises:
        ConvtoolError: not an ONNX file, truncated, or external data outside its folder.
    """
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        raise ConvtoolError("reading .onnx needs the onnx package: pip install onnx") from None
    data = read_bytes(path)  # a regular file, read once and no further than its size
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvtoolError(
            f"cannot read {str(path)!r} as an ONNX model (truncated, or not ONNX?): {text[:160]}"
        ) from None
    if not model.graph.node and not model.graph.initializer:
        raise ConvtoolError(f"{str(path)!r} holds no ONNX graph (is it really .onnx?)")
    folder = path.resolve().parent
    for place in _external_locations(model):
        target = (folder / place).resolve()
        if Path(place).is_absolute() or folder not in target.parents:
            raise ConvtoolError(
                f"{str(path)!r} keeps tensor data in {place!r}, outside its own folder; "
                f"convtool reads external data only next to the model"
            )
        if not target.is_file():
            raise ConvtoolError(f"{str(path)!r} keeps tensor data in {place!r}, which is missing")
    if _external_locations(model):
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(folder))
        except Exception as exc:
            raise ConvtoolError(
                f"cannot read the external tensor data of {str(path)!r}: {exc}"
            ) from None
    return model
