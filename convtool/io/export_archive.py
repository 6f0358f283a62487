"""Load a torch.export archive (.pt2) without ever unpickling more than `weights_only=True`.

`torch.export.load` trusts its input. In torch 2.x it unpickles archive members in four ways
that run arbitrary code (`torch.load(weights_only=False)` for members marked `use_pickle` in the
weights/constants configs, a `weights_only=False` fallback for the sample inputs and legacy
payloads, `pickle.loads` for `opaque_obj_*` constants, torch's own pickle loader for
`custom_obj_*` constants), and it `dlopen`s compiled AOTInductor code under
`data/aotinductor/`. So an archive is checked here first, member by member:

1. the file is read once, into memory, bounded by its size (what is checked is what is loaded:
   torch gets the same bytes, not the path, so the file cannot change in between);
2. the zip directory must be a plain torch.export archive: one top-level folder, no duplicate
   names, `archive_format` 'pt2' (older layouts are refused: they go through pickle fallbacks);
3. every member torch would unpickle is refused, naming the member: `use_pickle` payloads,
   `custom_obj_*` / `opaque_obj_*` constants, compiled code; every member torch would
   `torch.load` (sample inputs, legacy weight files) must load with `weights_only=True` here;
4. `torch.export.load` then runs with `torch.load` forced to `weights_only=True` and the other
   unpickling entry points replaced by a refusal, so a case this module did not foresee fails
   closed instead of running code.

Only the user's explicit opt-in (`allow_pickle=True`) skips all of this.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from convtool.errors import ConvtoolError
from convtool.io.tensors import read_bytes
from convtool.io.untrusted_ops import audit_program

# Sizes of the JSON members read here (configs); weights are never inflated by this module.
_MAX_CONFIG_BYTES = 64 * 1024 * 1024
_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


class _Refused(Exception):
    """Raised by the load-time guard when torch tries to unpickle something unsafely."""


def _refusal(path: Path, member: str, why: str) -> ConvtoolError:
    return ConvtoolError(
        f"{str(path)!r}: the archive member {member!r} {why}; unpickling it can run arbitrary "
        f"code, so convtool did not load the file. If you trust it, pass allow_pickle=True",
        params=("allow_pickle",),
    )


def _damaged(path: Path, why: str) -> ConvtoolError:
    return ConvtoolError(
        f"cannot read {str(path)!r} as a torch.export program: {why} (truncated, or not written "
        f"by torch.export.save?)"
    )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    if info.file_size > _MAX_CONFIG_BYTES:
        raise _damaged(path, f"the member {info.filename!r} is implausibly large")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise _damaged(path, f"the member {info.filename!r} is unreadable ({exc})") from None


def _json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Any:
    try:
        return json.loads(_read_member(archive, info, path))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _damaged(path, f"the member {info.filename!r} is not valid JSON") from None


def _loads_weights_only(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True, mmap=False)
    except Exception:
        return False
    return True


def check_archive(data: bytes, path: Path) -> None:
    """Refuse (ConvtoolError) an archive in which torch would unpickle anything unsafely.

    Args:
        data: the whole file.
        path: its name, for messages.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _damaged(path, f"not a zip archive ({exc})") from None
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        if not names:
            raise _damaged(path, "the archive is empty")
        if len(set(names)) != len(names):
            raise _damaged(path, "the archive lists a member twice")
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) != 1 or any("/" not in n for n in names):
            raise _damaged(path, "its members are not in one top-level folder")
        top = tops.pop() + "/"
        members = {i.filename[len(top) :]: i for i in infos}

        fmt = members.get("archive_format")
        if fmt is None or _read_member(archive, fmt, path).strip() != b"pt2":
            raise ConvtoolError(
                f"{str(path)!r} is not a current torch.export archive (no 'archive_format: pt2'); "
                f"older layouts are loaded through pickle, which convtool never does. Re-save it "
                f"with torch.export.save, or pass allow_pickle=True if you trust it",
                params=("allow_pickle",),
            )
        for name in members:
            if name.startswith("data/aotinductor/") or name.endswith((".so", ".dll", ".dylib")):
                raise _refusal(path, top + name, "is compiled code that torch would load")
        for name, info in members.items():
            if not name.endswith("_config.json"):
                continue
            config = _json(archive, info, path)
            entries = config.get("config") if isinstance(config, dict) else None
            if not isinstance(entries, dict):
                raise _damaged(path, f"the member {top + name!r} is not a payload config")
            for fqn, meta in entries.items():
                if not isinstance(meta, dict):
                    raise _damaged(path, f"the entry {fqn!r} of {top + name!r} is damaged")
                member = str(meta.get("path_name", ""))
                where = top + name.rsplit("/", 1)[0] + "/" + member
                if meta.get("use_pickle"):
                    raise _refusal(path, where, f"({fqn!r}) is marked as a pickled payload")
                if member.startswith(_PICKLED_PREFIXES):
                    raise _refusal(path, where, f"({fqn!r}) is a pickled Python object")
        for name, info in members.items():
            # What torch would torch.load itself (sample inputs, legacy weight and constant
            # files): it tries weights_only=True and falls back to a full unpickle on failure,
            # so it must succeed here with weights_only=True.
            if name.endswith(".pt"):
                payload = _read_member(archive, info, path) if info.file_size else b""
                if payload and not _loads_weights_only(payload):
                    raise _refusal(path, top + name, "holds pickled Python objects")


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """While torch.export.load runs: torch.load is weights_only, other unpicklers refuse."""
    from torch.export.pt2_archive import _package

    real_load = torch.load
    real_pickle_loads = pickle.loads
    real_script_loads = getattr(torch._C, "_pickle_load_obj", None)
    real_aoti = getattr(_package, "_load_aoti", None)

    def safe_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.setdefault("map_location", "cpu")
        try:
            return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise _Refused(str(exc)) from None

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _Refused("an unpickling or code-loading call")

    torch.load = safe_load
    pickle.loads = refuse
    if real_script_loads is not None:
        torch._C._pickle_load_obj = refuse
    if real_aoti is not None:
        _package._load_aoti = refuse
    try:
        yield
    finally:
        torch.load = real_load
        pickle.loads = real_pickle_loads
        if real_script_loads is not None:
            torch._C._pickle_load_obj = real_script_loads
        if real_aoti is not None:
            _package._load_aoti = real_aoti


def load_program(path: Path, *, allow_pickle: bool = False) -> Any:
    """The ExportedProgram in a .pt2 archive, never unpickling beyond `weights_only=True`.

    Args:
        path: the archive.
        allow_pickle: the user trusts the file: load it with `torch.export.load` as it is.

    Raises:
        ConvtoolError: the file is not a regular, readable torch.export archive, or loading it
            would unpickle something (the message names the member).
    """
    data = read_bytes(path)
    if allow_pickle:
        return _torch_export_load(io.BytesIO(data), path)
    check_archive(data, path)
    with _guard():
        program = _torch_export_load(io.BytesIO(data), path)
    audit_program(program, path)
    return program


def _torch_export_load(buffer: io.BytesIO, path: Path) -> Any:
    import logging
    import warnings

    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(buffer)
    except _Refused as exc:
        raise ConvtoolError(
            f"{str(path)!r}: loading it would unpickle Python objects ({str(exc)[:120]}); "
            f"convtool did not load the file. If you trust it, pass allow_pickle=True",
            params=("allow_pickle",),
        ) from None
    except Exception as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise _damaged(path, first[:200]) from None
    finally:
        logger.setLevel(level)
