"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every result, record and cache file restune writes goes through :func:`atomic_write`: the content is written to a
uniquely named temporary file in the destination's folder, flushed to disk, and renamed onto the destination, and the
folder is flushed so the rename itself survives a power loss. The temporary name is unique (``mkstemp``), so two
writers of the same file (two ranks, two sweeps sharing a run, a process pool) never write into each other's
temporary; the last rename wins with a complete file. This module uses the standard library only, so torch-free
readers such as :mod:`restune.harness.tables` can use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes"]


def _umask() -> int:
    # There is no way to read the umask without setting it; do it once, at import, rather than on every write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The mode ``open()`` would give a new file; ``mkstemp`` creates 0600 files, which other users could not read.
_DEFAULT_MODE = 0o666 & ~_umask()


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms (Windows) cannot open a folder; the rename is still atomic there
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems refuse to sync a folder; the file's content is on disk regardless
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], *, mode: int | None = None) -> Path:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path``, then move it onto ``path`` atomically.

    ``write`` receives the temporary file's path (it exists, empty) and may open it, truncate it or hand it to a
    library (``torch.save``, ``savefig`` with an explicit ``format``, safetensors). On any exception, including
    KeyboardInterrupt, the temporary file is removed and the destination is left as it was.

    Args:
        path: Destination file; its folder is created when missing.
        write: Writes the full content to the path it is given.
        mode: Permission bits of the result; default, what a new file gets from ``open()`` under the current umask.

    Returns:
        The destination path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _DEFAULT_MODE if mode is None else mode)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(target.parent, directory=True)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
