"""Errors of the server layer, and the one table that turns errno values into NBD errors."""

from __future__ import annotations

import errno

from protocol import Errno


class ConfigError(ValueError):
    """A bad command line or configuration value. The message names the bad value; the CLI
    prints it as one line and exits 1."""


# qemu's system_errno_to_nbd_errno (nbd/server.c): anything unlisted becomes EINVAL.
_ERRNO_TO_NBD: dict[int, Errno] = {
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.EOPNOTSUPP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(err: int | None, *, fast_zero: bool = False) -> Errno:
    """The NBD error for an ``OSError.errno``.

    ENOTSUP is only meaningful on the wire as the answer to a FAST_ZERO request (the spec
    reserves it for that); any other command gets EINVAL for it, as in qemu.
    """
    if err is None:
        return Errno.EIO
    nbd = _ERRNO_TO_NBD.get(err, Errno.EINVAL)
    if nbd is Errno.ENOTSUP and not fast_zero:
        return Errno.EINVAL
    return nbd
