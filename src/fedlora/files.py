"""Durable writes: once a call returns, its text is on disk, and a reader never sees a torn file.
And one writer per folder: :func:`folder_lock`."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlora.errors import FedloraError

LOCK_FILE = ".lock"


class FolderInUse(FedloraError):
    """Another process holds the folder's lock."""


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename, so readers see the old or the new file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def append_text(path: Path, text: str) -> None:
    """Append ``text`` and fsync; a kill mid-write can only leave a partial last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise :class:`FolderInUse` at once if another
    process holds it: two runs writing one folder would interleave their checkpoints.

    An flock on ``folder/.lock``, which records the holder's pid for the message. The OS drops
    the lock when its holder exits, however it exits, so a killed run leaves nothing to clean
    up and its resume takes the lock at once (the descriptor is not inherited by the
    processes a run starts).
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    with open(folder / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FolderInUse(f"{folder} is in use by another fedlora process (pid {holder}); "
                              "wait for it to end or stop it, then run again") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
