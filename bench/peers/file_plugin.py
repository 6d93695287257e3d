"""A minimal nbdkit Python plugin serving one file: the baseline a Python user would write.

Run: ``nbdkit -U SOCK -f python bench/peers/file_plugin.py file=IMAGE``.

It deliberately stays plain (os.pread/os.pwrite, no tricks), but declares the parallel thread
model and multi-conn, as a user who cared about speed would: the bar should be the best plain
Python plugin, not a crippled one.
"""

import errno
import os

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's python plugin at runtime

API_VERSION = 2

_path: str | None = None


def config(key: str, value: str) -> None:
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r} (expected file=PATH)")
    _path = value


def config_complete() -> None:
    if _path is None:
        raise RuntimeError("file=PATH is required")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def open(readonly: bool) -> int:  # nbdkit calls this exact name
    assert _path is not None
    return os.open(_path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd: int) -> None:
    os.close(fd)


def get_size(fd: int) -> int:
    return os.fstat(fd).st_size


def can_write(fd: int) -> bool:
    return True


def can_flush(fd: int) -> bool:
    return True


def can_multi_conn(fd: int) -> bool:
    # Every connection shares the host page cache, so a flush on one covers all.
    return True


def pread(fd: int, buf: bytearray, offset: int, flags: int) -> None:
    data = os.pread(fd, len(buf), offset)
    if len(data) != len(buf):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "short read")
    buf[:] = data


def pwrite(fd: int, buf: bytes, offset: int, flags: int) -> None:
    view = memoryview(buf)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(fd)


def flush(fd: int, flags: int) -> None:
    os.fdatasync(fd)
