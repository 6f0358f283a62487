"""Memory and disk checks made before any large allocation or write."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from convtool.errors import ConvtoolError

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"):
        if abs(n) < 1024 or unit == "YiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'8G', '512MiB', '1.5 GB', '1000000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise ConvtoolError(f"cannot read the size {text!r}; give bytes or e.g. 512M, 8G, 1.5T")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def available_memory() -> int:
    """Bytes of memory the kernel says are available now (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown platform: do not block


def check_memory(
    nbytes: int,
    what: str,
    alternative: str,
    limit: int | None = None,
    *,
    params: tuple[str, ...] = (),
    limit_param: str = "max_memory",
) -> None:
    """Refuse (ConvtoolError) an allocation of `nbytes` that would not fit in memory.

    Args:
        nbytes: bytes about to be allocated.
        what: what it is, for the message ("a dense 3.1e6 x 2.0e6 float32 matrix").
        alternative: what would work instead, in parameters ("use sparse=True").
        limit: the caller's limit; default: the machine's available memory.
        params: the parameters `alternative` names (see :class:`ConvtoolError`).
        limit_param: the caller's name for `limit` (`max_memory`, `memory_limit`).
    """
    budget = available_memory() if limit is None else limit
    if nbytes > budget:
        if limit is not None:
            source, params = f"`{limit_param}` is ", (*params, limit_param)
        else:
            source = "available memory is "
        raise ConvtoolError(
            f"{what} needs {human_bytes(nbytes)} but {source}{human_bytes(budget)}; {alternative}",
            params=params,
        )


def check_disk(
    path: Path, nbytes: int, what: str, alternative: str, *, params: tuple[str, ...] = ()
) -> None:
    """Refuse a write of `nbytes` into the folder of `path` that would not fit on its disk."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise ConvtoolError(f"cannot write to {str(folder)!r}: {exc.strerror or exc}") from None
    if nbytes > free:
        raise ConvtoolError(
            f"{what} needs {human_bytes(nbytes)} on disk but {str(folder)!r} has "
            f"{human_bytes(free)} free; {alternative}",
            params=params,
        )
