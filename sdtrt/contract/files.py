"""Writing files so that nothing is ever half written: outputs, configs, the catalog, spec files and engines.

Every write goes to a temporary name in the target's own folder (the same filesystem, so the rename is atomic),
is fsynced, then renamed into place and the folder fsynced: a reader sees the old file or the new one, and a
crash, a kill or a full disk leaves no partial file under the real name. A full disk is a named error
(``DiskFull``: which file, how much it needed, how much was free), with the temporary file removed.

Several processes writing one model repository (two exports, an export and a refit) take its lock first
(``repository_lock``), so that neither's catalog update or stale-model cleanup undoes the other's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from sdtrt.contract.errors import DiskFull, UsageError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full(path: str | Path, needed: int | None = None) -> DiskFull:
    """The named error for a write to ``path`` that found no space, with how much is free there now."""
    return DiskFull(path, needed, _free_bytes(Path(path).parent))


@contextlib.contextmanager
def no_space_is_disk_full(path: str | Path) -> Iterator[None]:
    """Raise a full disk met inside (an OSError from a library that writes its own files, e.g. the ONNX exporter)
    as DiskFull naming ``path``; every other error goes through as it is."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise disk_full(exc.filename or path) from None
        raise


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the folder's entry, not only the file's data)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other writer picks (pid and random), never matching its glob."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")


def write_atomic(path: str | Path, data: bytes | str | Callable[[object], None], *, exclusive: bool = False) -> Path:
    """Write ``data`` (bytes, text, or a function that writes to a binary file object) to ``path`` through a
    temporary file in the same folder: fsynced, then renamed. With ``exclusive`` an existing ``path`` is never
    replaced (FileExistsError): the file is linked into place, which fails rather than overwrites.

    A full disk raises DiskFull and leaves neither the temporary file nor a partial ``path``."""
    path = Path(path)
    temp = temporary_name(path)
    needed = len(data.encode() if isinstance(data, str) else data) if isinstance(data, (bytes, str)) else None
    try:
        with open(temp, "xb") as out:
            if callable(data):
                data(out)
            else:
                out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            os.link(temp, path)  # fails with FileExistsError instead of replacing
            temp.unlink()
        else:
            os.replace(temp, path)
        fsync_folder(path.parent)
        return path
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno in _NO_SPACE:
            raise disk_full(path, needed) from None
        raise
    except BaseException:  # the writer's own error, or an interrupt: its temporary file goes all the same
        temp.unlink(missing_ok=True)
        raise


def writer_gone(name: str) -> bool:
    """Whether the process that named a temporary file or folder (``temporary_name``'s, an export's work folder
    ``.<repo>.partial-<pid>-...``, a replaced model's ``.<model>.old-<pid>``) has exited: only then is it a
    crashed writer's leftover. A name without a pid, or a writer still running, is never a leftover."""
    found = re.search(r"\.(\d+)\.[0-9a-f]{8}\.partial$|\.partial-(\d+)-|\.old-(\d+)$", name)
    if found is None:
        return False
    try:
        os.kill(int(next(group for group in found.groups() if group)), 0)  # signal 0: only asks whether it exists
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process, running
        return False
    return False


def copy_atomic(source: str | Path, target: str | Path) -> Path:
    """``source`` copied to ``target`` through a temporary file (see write_atomic)."""
    with open(source, "rb") as src:
        return write_atomic(target, lambda out: shutil.copyfileobj(src, out, 1 << 20))


LOCK_NAME = ".sdtrt.lock"


@contextlib.contextmanager
def repository_lock(repo: str | Path, wait_s: float = 3600.0, report: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``repo``'s write lock (an flock on a file beside its folder, so it exists before the repository does
    and survives the folder's replacement); waits up to ``wait_s`` for another writer, saying so once."""
    repo = Path(repo)
    repo.parent.mkdir(parents=True, exist_ok=True)
    lock = repo.parent / f".{repo.name}{LOCK_NAME}"
    with open(lock, "a+") as handle:
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UsageError(f"another sdtrt process is still writing {repo} after {wait_s:.0f} s (its lock: "
                                     f"{lock}); wait for it to finish, or stop it") from None
                if not said:
                    handle.seek(0)
                    report(f"{repo}: waiting for another export into it to finish ({handle.read().strip()})")
                    said = True
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
