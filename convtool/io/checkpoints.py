"""Model checkpoints read from files: raw objects only (modules, tensors, programs).

- :func:`detect_format` tells a state_dict / torch file, a TorchScript archive and a
  torch.export program apart by content.
- :func:`read_state_dict`, :func:`read_torch_object`, :func:`read_torchscript` and
  :func:`~convtool.io.export_archive.load_program` return what the file holds; unpickling goes
  no further than `torch.load(weights_only=True)` unless the user passes `allow_pickle`.
- :func:`import_model` builds `--model MODULE:CALLABLE` and :func:`fit_state_dict` loads the
  tensors into it.

Interpreting these objects as conv layers is the core's job (:mod:`convtool.programs`,
:mod:`convtool.inventory`); :mod:`convtool.source` puts readers and interpretation together.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convtool.errors import ConvtoolError
from convtool.io.export_archive import load_program as load_program
from convtool.io.tensors import read_bytes, read_tensors, tensors_from_object, torch_load
from convtool.io.untrusted_ops import audit_script_module, check_script_code

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# ---------------------------------------------------------------------------------- format
def detect_format(path: Path) -> str:
    """'numpy', 'safetensors', 'export', 'torchscript', 'torch' (what torch.load reads) or
    'unknown' (a file that is none of these by its extension or content).

    `.pt2` is a torch.export program; other zip archives are told apart by their content:
    TorchScript archives have a `code/` folder and `constants.pkl`, export archives a
    `models/*.json` and `archive_format`.
    """
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return "numpy"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".pt2":
        return "export"
    try:
        with zipfile.ZipFile(path) as archive:
            inner = {name.split("/", 1)[-1] for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError):
        # legacy torch.save files are not zips: trust the extension only
        return "torch" if suffix in TORCH_SUFFIXES else "unknown"
    if "archive_format" in inner or any(n.startswith("models/") for n in inner):
        return "export"
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        return "torchscript"
    return "torch"


# ---------------------------------------------------------------------------------- --model
def _kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConvtoolError(
            f"`model_kwargs` must be a JSON object like '{{\"num_classes\": 10}}', got {text!r} "
            f"({exc.msg})",
            params=("model_kwargs",),
        ) from None
    if not isinstance(value, dict):
        raise ConvtoolError(
            f"`model_kwargs` must be a JSON object like '{{\"num_classes\": 10}}', got {text!r}",
            params=("model_kwargs",),
        )
    return value


def _import(module_name: str, target: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path:  # like uvicorn: MODULE is importable from the current folder
        sys.path.insert(0, cwd)
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ConvtoolError(
                    f"model={target!r}: the file {module_name!r} does not exist",
                    params=("model",),
                )
            spec = importlib.util.spec_from_file_location(file.stem, file)
            if spec is None or spec.loader is None:
                raise ConvtoolError(
                    f"model={target!r}: cannot import {module_name!r}",
                    params=("model",),
                )
            module = importlib.util.module_from_spec(spec)
            sys.modules[file.stem] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except ConvtoolError:
        raise
    except ModuleNotFoundError as exc:
        raise ConvtoolError(
            f"model={target!r}: cannot import {module_name!r} ({exc}); run convtool from the "
            f"folder that holds it or add that folder to PYTHONPATH",
            params=("model",),
        ) from None
    except Exception as exc:
        raise ConvtoolError(
            f"model={target!r}: importing {module_name!r} failed: {type(exc).__name__}: "
            f"{_first_line(exc)}",
            params=("model",),
        ) from None


def import_model(target: str, kwargs_json: str | None = None) -> nn.Module:
    """Build the architecture named by `model="MODULE:CALLABLE"` (and `model_kwargs`, JSON).

    MODULE is imported with the current folder on `sys.path` (or is a path to a .py file);
    CALLABLE may be dotted (`Net.small`) and must return an `nn.Module` (an `nn.Module` instance
    is used as it is).
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ConvtoolError(
            f"`model` must be MODULE:CALLABLE, e.g. mypackage.models:make_model, got {target!r}",
            params=("model",),
        )
    kwargs = _kwargs(kwargs_json)
    obj = _import(module_name.strip(), target)
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ConvtoolError(
                f"model={target!r}: {module_name!r} has no attribute {part!r}",
                params=("model",),
            )
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ConvtoolError(
                f"model={target!r} is a module instance; drop `model_kwargs`",
                params=("model", "model_kwargs"),
            )
        return obj
    if not callable(obj):
        raise ConvtoolError(
            f"model={target!r} is a {type(obj).__name__}, not a callable",
            params=("model",),
        )
    try:
        model = obj(**kwargs)
    except Exception as exc:
        raise ConvtoolError(
            f"model={target!r}: calling it with {kwargs or 'no arguments'} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}",
            params=("model",),
        ) from None
    if not isinstance(model, nn.Module):
        raise ConvtoolError(
            f"model={target!r} returned a {type(model).__name__}, not a torch.nn.Module",
            params=("model",),
        )
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _listing(keys: list[str], limit: int = 6) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _align_prefix(tensors: dict[str, Tensor], expected: Mapping[str, Any]) -> dict[str, Tensor]:
    """Drop a wrapper prefix ('model.', 'net.') when that makes the keys match exactly."""
    if set(tensors) == set(expected):
        return tensors
    heads = {k.split(".", 1)[0] for k in tensors}
    if len(heads) == 1 and all("." in k for k in tensors):
        cut = len(next(iter(heads))) + 1
        stripped = {k[cut:]: v for k, v in tensors.items()}
        if set(stripped) == set(expected):
            return stripped
    return tensors


def fit_state_dict(model: nn.Module, tensors: dict[str, Tensor], path: Path, target: str) -> None:
    """`model.load_state_dict(tensors, strict=True)`, or one line listing every difference."""
    expected = model.state_dict()
    tensors = _align_prefix(tensors, expected)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} in the file vs {tuple(expected[k].shape)} in the model"
        for k, v in tensors.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes, 3)}")
    if problems:
        raise ConvtoolError(
            f"the state_dict in {str(path)!r} does not fit model={target!r}: {'; '.join(problems)}",
            params=("model",),
        )
    floats = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if len(floats) == 1:  # keep the checkpoint's precision (a float64 file stays float64)
        model.to(floats.pop())
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ConvtoolError(
            f"the state_dict in {str(path)!r} does not fit model={target!r}: {_first_line(exc)}",
            params=("model",),
        ) from None


def read_state_dict(
    path: Path, fmt: str, *, allow_pickle: bool = False
) -> Tensor | dict[str, Tensor]:
    """The tensors of a state_dict file (a module or wrapper saved whole gives its state_dict)."""
    if fmt == "torch":
        obj = torch_load(path, allow_pickle=allow_pickle)
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        return tensors_from_object(_find_module(obj) or obj, path)
    return read_tensors(path)


def _find_module(obj: Any) -> Any:
    """A module's state_dict when a checkpoint holds the module itself (or in a wrapper)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for value in obj.values():
            if isinstance(value, nn.Module):
                return value.state_dict()
    return None


def read_torch_object(path: Path, *, allow_pickle: bool = False) -> nn.Module | Any:
    """The module a torch file holds (itself or in a wrapper dict), else what `torch.load` gave."""
    obj = torch_load(path, allow_pickle=allow_pickle)
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, Mapping):
        module = next((v for v in obj.values() if isinstance(v, nn.Module)), None)
    return obj if module is None else module


def read_torchscript(path: Path, *, allow_pickle: bool = False) -> torch.jit.ScriptModule:
    """A TorchScript archive (`torch.jit.save`).

    Loading runs the archive's `__setstate__` code and convtool later runs its forward, so unless
    the user trusts the file (`allow_pickle`), code that calls file-touching operators is refused
    before loading and the loaded graphs are audited (:mod:`convtool.io.untrusted_ops`). The
    bytes checked are the bytes loaded.
    """
    data = read_bytes(path)
    if not allow_pickle:
        check_script_code(data, path)
    try:
        with warnings.catch_warnings():  # torch's TorchScript deprecation notice
            warnings.simplefilter("ignore")
            model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        raise ConvtoolError(
            f"cannot read {str(path)!r} as a TorchScript archive (truncated?): {_first_line(exc)}"
        ) from None
    if not allow_pickle:
        audit_script_module(model, path)
    return model
