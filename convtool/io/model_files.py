"""Writing and reading converted models.

- `.pt2`: a torch.export program; self-contained (aten ops and tensors only), it runs with
  `torch.export.load(path).module()(x)` without convtool or the model's source.
- `.pt` / `.pth`: `{"state_dict": ..., "convtool": metadata}` from `torch.save`, loadable with
  `torch.load(weights_only=True)` (the metadata is plain dicts, lists, strings and numbers).
- `.safetensors`: the converted state_dict; the metadata is JSON under the `convtool` key of the
  header. Sparse tensors (safetensors has none) are stored as `KEY.__indices__` and
  `KEY.__values__` (COO) and rebuilt in their original layout.

The metadata lists each converted layer and its input shape, which is all
:func:`convtool.converted.load_converted` needs to rebuild the converted model from the original
architecture.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convtool.errors import ConvtoolError
from convtool.io.tensors import check_readable, torch_load

MODEL_FORMATS = {
    ".pt2": "export",
    ".pt": "torch",
    ".pth": "torch",
    ".safetensors": "safetensors",
}
META_KEY = "convtool"
FORMAT_TAG = "convtool-converted-model"
_INDICES, _VALUES = ".__indices__", ".__values__"


def model_format(path: Path) -> str:
    """'export', 'torch' or 'safetensors' from the output's extension; refuses others."""
    fmt = MODEL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConvtoolError(
            f"cannot tell the output format of {str(path)!r}; use .pt2 (torch.export program, "
            f"runs without convtool), .pt or .safetensors (converted state_dict)"
        )
    return fmt


def metadata(
    report: Mapping[str, Any], source: str, source_kind: str, *, version: str
) -> dict[str, Any]:
    """What a converted state_dict needs to be rebuilt (from a conversion report's dict).

    `version` is the writing convtool's version (the caller's `convtool.__version__`: io does
    not import the package it serves).
    """
    return {
        "format": FORMAT_TAG,
        "version": 2,
        "convtool_version": version,
        "source": source,
        "source_kind": source_kind,
        "to": report["to"],
        "sparse": bool(report["sparse"]),
        "example_input_shape": list(report["example_input_shape"]),
        "layers": [
            {
                "name": layer["name"],
                "kind": layer["kind"],
                "replacement": layer["replacement"],
                "input_shape": list(layer["input_shape"]),
                "call": layer.get("call", "module"),
                "spec": layer.get("spec"),
            }
            for layer in report["layers"]
        ],
    }


def write_program(path: Path, program: Any) -> None:
    """Save an ExportedProgram."""
    try:
        torch.export.save(program, str(path))
    except OSError:
        raise
    except Exception as exc:
        raise ConvtoolError(
            f"cannot save the exported program to {str(path)!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def _plain(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Detached tensors; a tensor that shares memory with an earlier one is copied."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        t = value.detach()
        if t.layout == torch.strided:
            ident = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
            if ident in seen or not t.is_contiguous():
                t = t.contiguous().clone()
            seen.add(ident)
        out[key] = t
    return out


def write_state_dict(path: Path, state: Mapping[str, Any], meta: dict[str, Any]) -> None:
    """Write a converted state_dict and its metadata, in the format `path`'s extension names."""
    tensors = _plain(state)
    if model_format(path) == "torch":
        torch.save({"state_dict": tensors, META_KEY: meta}, path)
        return
    sparse = {
        key: {"shape": list(t.shape), "layout": str(t.layout).removeprefix("torch.")}
        for key, t in tensors.items()
        if t.layout != torch.strided
    }
    _write_safetensors(path, tensors, {META_KEY: json.dumps({**meta, "sparse_tensors": sparse})})


# safetensors' dtype names
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _pieces(key: str, t: Tensor) -> list[tuple[str, Tensor]]:
    """The dense tensors `t` is stored as: itself, or a sparse one's COO indices and values."""
    if t.layout == torch.strided:
        return [(key, t.contiguous())]
    coo = (t if t.layout == torch.sparse_coo else t.to_sparse_coo()).coalesce()
    return [(key + _INDICES, coo.indices()), (key + _VALUES, coo.values())]


def _write_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str]) -> None:
    """The .safetensors format, written tensor by tensor straight from memory.

    `safetensors.torch.save_file` first copies every tensor into one bytes object, which
    doubles the peak memory of a multi-GiB converted model; here the header (shapes and
    offsets, known without the data) comes first and each tensor's bytes follow, with at most
    one sparse tensor's COO copy alive at a time. Readable by `safetensors.safe_open`.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, t in tensors.items():
        if t.layout == torch.strided:
            shapes = [(key, t.dtype, tuple(t.shape))]
        elif t.layout == torch.sparse_csr or (t.layout == torch.sparse_coo and t.is_coalesced()):
            nnz = t.values().numel() if t.layout == torch.sparse_csr else t._nnz()
            shapes = [
                (key + _INDICES, torch.int64, (t.dim(), nnz)),
                (key + _VALUES, t.dtype, (nnz,)),
            ]
        else:  # the coalesced copy tells the nnz
            shapes = [(k, p.dtype, tuple(p.shape)) for k, p in _pieces(key, t)]
        for name, dtype, shape in shapes:
            if dtype not in _ST_DTYPES:
                raise ConvtoolError(f"cannot write {name!r} of dtype {dtype} to .safetensors")
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format allows space padding; data starts aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, t in tensors.items():
            for _, piece in _pieces(key, t):
                if piece.numel():
                    f.write(piece.reshape(-1).view(torch.uint8).numpy().data)
                del piece


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT_TAG:
        raise ConvtoolError(
            f"{str(path)!r} is not a converted model written by `convtool convert` (no "
            f"{META_KEY!r} metadata)"
        )
    if meta.get("to") not in ("lc", "fc") or not isinstance(meta.get("layers"), list):
        raise ConvtoolError(f"the convtool metadata in {str(path)!r} is damaged")
    return dict(meta)


def read_converted(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, metadata) of a converted model written by :func:`write_state_dict`."""
    check_readable(path)
    fmt = model_format(path)
    if fmt == "export":
        raise ConvtoolError(
            f"{str(path)!r} is a torch.export program; load it with torch.export.load(path)"
            f".module() (it needs no rebuilding)"
        )
    if fmt == "torch":
        obj = torch_load(path)
        if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
            raise ConvtoolError(f"{str(path)!r} is not a converted model written by convtool")
        meta = _check_meta(obj.get(META_KEY), path)
        return dict(obj["state_dict"]), meta
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            flat = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConvtoolError(f"cannot read {str(path)!r} as .safetensors: {exc}") from None
    try:
        raw = json.loads(header.get(META_KEY, "null"))
    except json.JSONDecodeError:
        raw = None
    meta = _check_meta(raw, path)
    state: dict[str, Tensor] = {}
    sparse = meta.get("sparse_tensors") or {}
    for key, info in sparse.items():
        try:  # checked: a damaged file must not become an out-of-bounds sparse tensor
            coo = torch.sparse_coo_tensor(
                flat.pop(key + _INDICES),
                flat.pop(key + _VALUES),
                tuple(info["shape"]),
                check_invariants=True,
            ).coalesce()
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise ConvtoolError(
                f"the sparse tensor {key!r} in {str(path)!r} is damaged: {exc}"
            ) from None
        layout = info.get("layout", "sparse_coo")
        state[key] = coo if layout == "sparse_coo" else _relayout(coo, layout)
    state.update(flat)
    return state, meta


def _relayout(coo: Tensor, layout: str) -> Tensor:
    if layout == "sparse_csr":
        return coo.to_sparse_csr()
    if layout == "sparse_csc":
        return coo.to_sparse_csc()
    raise ConvtoolError(f"unsupported sparse layout {layout!r} in a converted model")
