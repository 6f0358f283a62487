"""Read the tensors in a file without running code: .npy, .npz, .pt/.pth, .safetensors.

The one exception is :func:`torch_load` with `allow_pickle=True`, the user's explicit opt-in
(--allow-pickle) for files that hold pickled modules.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convtool.errors import ConvtoolError

TENSOR_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
# Containers people wrap state_dicts in (Lightning, timm, torchvision references, DDP).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def check_readable(path: Path) -> int:
    """One clear line for a missing, unreadable, empty or non-regular file; returns its size.

    Only regular files are read (symlinks are followed): a FIFO would block forever and a
    device such as /dev/zero never ends, so both are refused before anything opens them.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConvtoolError(f"{str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConvtoolError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConvtoolError(f"{str(path)!r} is a directory; give a file")
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(info.st_mode)
            else "a device"
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "a socket"
            if stat.S_ISSOCK(info.st_mode)
            else "not a regular file"
        )
        raise ConvtoolError(f"{str(path)!r} is {kind}; give a regular file")
    if info.st_size == 0:
        raise ConvtoolError(f"{str(path)!r} is empty")
    if not os.access(path, os.R_OK):
        raise ConvtoolError(f"cannot read {str(path)!r}: permission denied")
    return info.st_size


def read_bytes(path: Path) -> bytes:
    """The whole of a regular file, never more than the size it had when checked."""
    size = check_readable(path)
    try:
        with path.open("rb") as f:
            data = f.read(size)
    except OSError as exc:
        raise ConvtoolError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if len(data) != size:
        raise ConvtoolError(f"{str(path)!r} changed while it was read")
    return data


def _from_numpy(array: np.ndarray, path: Path, key: str | None = None) -> Tensor:
    where = f"{str(path)!r}" + (f" [{key!r}]" if key else "")
    if array.dtype == object or array.dtype.fields is not None:
        raise ConvtoolError(f"{where} holds {array.dtype} data, not a numeric array")
    if array.dtype.kind not in "fiub":
        raise ConvtoolError(f"{where} holds {array.dtype} data, not a real numeric array")
    if not array.dtype.isnative:  # e.g. '>f4' from a big-endian machine: torch needs native order
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def pickled_global(exc: BaseException) -> str | None:
    """The Python object a refused `weights_only` load wanted to import, e.g. 'posix.system'."""
    match = _GLOBAL.search(str(exc))
    return match.group(1) if match else None


def refuse_pickle(path: Path, exc: BaseException) -> ConvtoolError:
    """The one-line refusal for a file that holds pickled Python objects (never unpickled)."""
    needs = pickled_global(exc)
    what = f" (it imports {needs})" if needs else ""
    return ConvtoolError(
        f"{str(path)!r} holds a pickled Python object{what}; unpickling it can run arbitrary "
        f"code, so convtool did not load it. If you trust the file, pass allow_pickle=True; "
        f"better, re-save it with torch.save(model.state_dict(), ...) and pass "
        f"model='MODULE:CALLABLE'",
        params=("allow_pickle", "model"),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def torch_load(path: Path, *, allow_pickle: bool = False) -> Any:
    """`torch.load` on CPU; `weights_only=True` unless the user opted in with --allow-pickle.

    With `allow_pickle`, the safe load is still tried first, so only files that need it are
    unpickled in full.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says it
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        # weights_only refused a global: the file wants to run code to load.
        if not allow_pickle:
            raise refuse_pickle(path, exc) from None
    except Exception as exc:  # whatever a damaged file makes the unpickler raise
        raise _unreadable(path, exc) from None
    cwd = os.getcwd()
    if cwd not in sys.path:  # classes of a pickled model are importable like --model's
        sys.path.insert(0, cwd)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as exc:
        raise ConvtoolError(
            f"cannot unpickle {str(path)!r}: {_first_line(exc)[:200]}; the model's classes must "
            f"be importable (run from the project folder or set PYTHONPATH)"
        ) from None
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> ConvtoolError:
    return ConvtoolError(
        f"cannot read {str(path)!r} as a PyTorch file (truncated or not a torch.save file?): "
        f"{_first_line(exc)[:200]}"
    )


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """A flat `{name: tensor}` from a state_dict, peeling common wrappers and `module.` prefixes."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise ConvtoolError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a tensor or a state_dict"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ConvtoolError(f"{str(path)!r} holds no tensors (keys: {_key_list(obj)})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _key_list(obj: Mapping[Any, Any], limit: int = 8) -> str:
    keys = [str(k) for k in obj]
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def tensors_from_object(obj: Any, path: Path) -> Tensor | dict[str, Tensor]:
    """A single dense tensor, or a flat `{name: tensor}`, from what `torch.load` returned."""
    if isinstance(obj, Tensor):
        if obj.is_sparse or obj.layout != torch.strided:
            raise ConvtoolError(f"{str(path)!r} holds a sparse tensor; give a dense kernel")
        return obj
    return unwrap_state_dict(obj, path)


def read_tensors(path: Path) -> Tensor | dict[str, Tensor]:
    """A single tensor, or a flat `{name: tensor}` mapping, from a tensor file.

    Never unpickles arbitrary objects: numpy with `allow_pickle=False`, torch with
    `weights_only=True`, safetensors has no code at all.
    """
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return _from_numpy(np.load(path, allow_pickle=False), path)
        except ValueError as exc:
            if "pickled" in str(exc):  # not .npy magic: numpy would fall back to unpickling
                raise ConvtoolError(
                    f"{str(path)!r} is not a NumPy .npy file (numpy would have to unpickle it, "
                    f"which convtool never does); save the kernel with numpy.save"
                ) from None
            raise ConvtoolError(f"cannot read {str(path)!r} as .npy: {exc}") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: _from_numpy(archive[k], path, k) for k in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ConvtoolError(f"cannot read {str(path)!r} as .npz: {exc}") from None
        if not arrays:
            raise ConvtoolError(f"{str(path)!r} holds no arrays")
        return arrays
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return unwrap_state_dict(load_file(str(path)), path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConvtoolError(
                f"cannot read {str(path)!r} as .safetensors (truncated, or another format with "
                f"this extension?): {_first_line(exc)[:160]}"
            ) from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return tensors_from_object(torch_load(path), path)
    raise ConvtoolError(
        f"cannot tell the format of {str(path)!r} from its extension; use one of "
        f"{', '.join(TENSOR_SUFFIXES)}"
    )
