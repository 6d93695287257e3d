"""Linux system calls the ``file`` driver needs and :mod:`os` does not offer.

``fallocate(2)`` with its mode bits (``os`` has only ``posix_fallocate``) and the
block-device ioctls. Each wrapper raises ``OSError`` with the
errno the kernel gave, like the functions of :mod:`os`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# <linux/fs.h>: _IO(0x12, 104), _IO(0x12, 119)
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277

#: errnos meaning "this filesystem or device can't do that", as opposed to a real failure.
#: EINVAL is here because some filesystems answer it for modes or ranges they don't handle.
UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``. ctypes drops the GIL for the call, so it may run in a worker thread."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def block_device_sector_size(fd: int) -> int:
    """Logical sector size of a block device (the O_DIRECT alignment it needs)."""
    buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    size: int = struct.unpack("i", buf)[0]
    return size


def block_device_discard(fd: int, offset: int, length: int) -> None:
    """``BLKDISCARD``: unmap a range of a block device (contents afterwards unspecified)."""
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))



# <linux/magic.h>: filesystems that live in memory, where no read or write waits for a disk.
_MEMORY_FS_MAGICS = frozenset({0x01021994, 0x858458F6})  # TMPFS_MAGIC, RAMFS_MAGIC
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


def is_memory_fs(fd: int) -> bool:
    """Whether ``fd`` lives on tmpfs/ramfs. ``f_type`` is the first field of ``struct statfs``
    (a machine word) on every Linux ABI; os.statvfs does not expose it."""
    buf = ctypes.create_string_buffer(256)
    if _fstatfs(fd, buf) != 0:
        return False
    f_type: int = ctypes.c_long.from_buffer(buf).value
    return (f_type & 0xFFFFFFFF) in _MEMORY_FS_MAGICS
