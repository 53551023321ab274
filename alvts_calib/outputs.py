"""Output files: never clobber an input or a special file, one writer per output, atomic writes.

Every file the toolkit writes goes through `atomic_write`: it follows a symbolic link to the file it names,
refuses directories and special files (devices, pipes, sockets), writes a temporary file beside the target and
renames it over the target, so a failed or interrupted write leaves the old file as it was. The CLI also checks
that an output is none of the command's inputs (`check_output`) and holds `output_lock` while it runs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import AlvtsError

LOCK_SUFFIX = ".lock"


def output_target(path: str | Path) -> Path:
    """The regular file `path` names (through symbolic links), after checking it is one that may be replaced."""
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    except OSError as error:
        raise AlvtsError(f"cannot use {path} as an output ({error.strerror}); choose another path") from None
    if stat.S_ISDIR(mode):
        raise AlvtsError(f"{path} is a directory; give a file path for the output")
    if not stat.S_ISREG(mode):
        raise AlvtsError(f"{path} is a special file (a device, pipe or socket), not a regular file; give a file path")
    return target


def check_output(path: str | Path, inputs: Iterable[str | Path]) -> Path:
    """`output_target(path)`, refusing it when it is the same file as one of `inputs` (also through links)."""
    target = output_target(path)
    if not target.exists():
        return target
    written = target.stat()
    for source in inputs:
        try:
            read = os.stat(source)
        except OSError:
            continue
        if (read.st_dev, read.st_ino) == (written.st_dev, written.st_ino):
            raise AlvtsError(
                f"{path} is the input {source}; writing it would destroy the input: choose another output path"
            )
    return target


def input_files(paths: Iterable[str | Path | None]) -> list[Path]:
    """The files `paths` name, a folder giving the files directly inside it (a model or data folder)."""
    files: list[Path] = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        files.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    return files


def _default_mode(target: Path) -> int:
    """The mode of the file being replaced, or what a new file gets under the process umask."""
    if target.exists():
        return stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(temporary)` and rename the temporary file over `path`'s target; returns `path`.

    On any failure (a full disk, a missing permission) the temporary file is removed, the file at `path` is left
    as it was, and the error is one line.
    """
    target = output_target(path)
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(handle)
        write(temporary)
        os.chmod(temporary, _default_mode(target))
        os.replace(temporary, target)
    except (OSError, SafetensorError) as error:
        reason = "no space left on device" if _disk_full(error) else getattr(error, "strerror", None) or str(error)
        raise AlvtsError(
            f"could not write {path} ({reason}); what was there is unchanged: free some space or choose another path"
        ) from error
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    return Path(path)


def _disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(error)


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + LOCK_SUFFIX)


@contextmanager
def output_lock(path: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold an advisory lock on `path`'s output (`PATH.lock`) for the block, so a second writer fails at once.

    The lock dies with the process (fcntl.flock), so a lock file left by a killed run never blocks; the file is
    removed on exit while still held.
    """
    lock = lock_path(output_target(path))
    handle = _acquire(lock, path)
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"pid {os.getpid()}: {command or ' '.join(sys.argv)}".encode())
        yield
    finally:
        os.unlink(lock)
        os.close(handle)


def _acquire(lock: Path, path: str | Path) -> int:
    """An open, exclusively locked handle on `lock`, the file currently at that path."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 4096).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise AlvtsError(
                f"{path} is being written by another alvts run ({holder}); wait for it to finish or choose another "
                "output path"
            ) from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle).st_ino:
            return handle
        os.close(handle)  # the previous holder removed the file between our open and lock: lock the new one
