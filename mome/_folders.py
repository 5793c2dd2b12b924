"""Replace a folder or a file all at once: write a hidden sibling, then swap it in.

``save_pretrained`` writes ``.<name>.<pid>.<random>.tmp`` next to the target and moves it into
place. On Linux the swap with an existing folder is one ``renameat2(RENAME_EXCHANGE)`` call, so
the target name always holds a complete folder (the earlier one or the new one). Elsewhere it takes
two renames (earlier folder aside to ``.old``, new one in); a kill between them leaves no folder
under the target name, only the two hidden ones. The process id in the hidden names lets a later
save remove what dead processes left behind, without touching a save that is still running.

A single file (a Lightning checkpoint) is written the same way by :func:`write_file_atomically`: into
``.<name>.<pid>.<random>.tmp`` beside it, flushed to disk, then ``os.replace``-d over the target (one
atomic rename on POSIX and Windows), so the target name holds the earlier file or the new one, never
part of one.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["hidden_sibling", "remove_stale_siblings", "swap_into_place", "write_file_atomically"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SIBLING_SUFFIXES = (".tmp", ".old")


def hidden_sibling(target: Path) -> Path:
    """A new empty folder ``.<name>.<pid>.<random>.tmp`` beside ``target`` (same file system)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_siblings(target: Path) -> list[Path]:
    """Delete the hidden ``.tmp``/``.old`` folders (or files) of ``target`` whose writing process is gone.

    Returns what was removed. Those of live processes (a save running now) are left alone.
    """
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        pid_field = path.name[len(target.name) + 2 :].split(".", 1)[0]
        if path.suffix not in _SIBLING_SUFFIXES or not pid_field.isdigit() or _process_is_alive(int(pid_field)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def exchange_paths(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(..., RENAME_EXCHANGE)``).

    Returns False where the platform or file system does not offer it (nothing changed then).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def swap_into_place(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``, replacing and deleting what was there."""
    if not target.exists():
        new.rename(target)
    elif exchange_paths(new, target):  # ``new`` now holds the earlier folder
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = new.with_suffix(".old")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_file_atomically(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through ``write(file)`` so that it appears whole or not at all.

    The bytes go to a hidden sibling on the same file system, are flushed and fsync-ed, and the sibling is
    renamed over ``target`` (``os.replace``). A process killed at any point leaves ``target`` as it was;
    the sibling it leaves is removed by the next write to ``target`` (:func:`remove_stale_siblings`). An
    exception from ``write`` removes the sibling and propagates.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(handle)  # reopened by name below, so ``file.name`` is the path
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # what open() would have given (mkstemp makes it private: 0o600)
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
