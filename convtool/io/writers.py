"""Atomic, no-clobber output files.

Everything is written to a temporary file beside the target and renamed into place only when
complete, so a failed or interrupted run never leaves a partial file and never clobbers one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from convtool.errors import ConvtoolError


def check_target(path: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that exists (without `force`), is an input, or cannot be created."""
    for source in inputs:
        with contextlib.suppress(OSError):
            if path.exists() and path.samefile(source):
                raise ConvtoolError(f"refusing to write over the input file {str(path)!r}")
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ConvtoolError(
            f"{str(path)!r} exists and is not a regular file (a device, FIFO or socket); convtool "
            f"only writes regular files"
        )
    if path.exists() and not force:
        raise ConvtoolError(
            f"{str(path)!r} already exists; pass force=True to overwrite it", params=("force",)
        )
    if path.is_dir():
        raise ConvtoolError(f"{str(path)!r} is a directory; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConvtoolError(f"the output folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConvtoolError(f"the output folder {str(folder)!r} is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error(exc: OSError, target: Path) -> ConvtoolError:
    if exc.errno == errno.ENOSPC:
        return ConvtoolError(f"no space left on the disk while writing {str(target)!r}")
    return ConvtoolError(f"cannot write {str(target)!r}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_outputs(
    targets: Sequence[Path], *, force: bool, inputs: Sequence[Path] = ()
) -> Iterator[list[Path]]:
    """Yield temporary paths to write; move them onto `targets` together when the block succeeds.

    Temporaries keep the target's suffix (some writers append one otherwise). On any exception,
    KeyboardInterrupt included, they are deleted and the targets are untouched.
    """
    for target in targets:
        check_target(target, force, inputs)
    temps: list[Path] = []
    try:
        for target in targets:
            fd, name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
            )
            os.close(fd)
            temps.append(Path(name))
        yield temps
        mode = 0o666 & ~_umask()  # mkstemp makes 0600 (and some writers recreate the file)
        for temp, target in zip(temps, targets, strict=True):
            os.chmod(temp, mode)
            if force:
                os.replace(temp, target)
            else:
                try:  # link() refuses an existing target: no race with another writer
                    os.link(temp, target)
                except FileExistsError:
                    raise ConvtoolError(
                        f"{str(target)!r} appeared while writing; pass force=True to overwrite it",
                        params=("force",),
                    ) from None
                except OSError:  # filesystems without hard links
                    if target.exists():
                        raise ConvtoolError(f"{str(target)!r} already exists") from None
                    os.replace(temp, target)
    except OSError as exc:
        raise _os_error(exc, targets[len(temps) - 1] if temps else targets[0]) from None
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink()
