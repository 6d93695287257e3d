"""Listening sockets: TCP (IPv4 and IPv6), Unix, and systemd socket activation."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass

from .errors import ConfigError

#: systemd passes activated sockets from this descriptor on (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3
_BACKLOG = 128


@dataclass(eq=False)
class Listener:
    """One listening socket. ``path`` is set for a Unix socket this process created (removed at
    close); activated sockets belong to whoever passed them."""

    sock: socket.socket
    kind: str  # "tcp" or "unix"
    address: str
    path: str | None = None

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _describe(sock: socket.socket) -> tuple[str, str]:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return "unix", name if isinstance(name, str) else name.decode(errors="replace")
    host, port = name[0], name[1]
    return "tcp", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_tcp(host: str | None, port: int) -> list[Listener]:
    """Listen on every address ``host`` resolves to (all interfaces, v4 and v6, if None).

    With port 0 the first socket's kernel-chosen port is reused for the others, so one port
    number describes the server."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"invalid port {port}: must be 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve bind address {host!r}: {e.strerror}") from None
    # IPv4 first: a failure to bind IPv6 on a v4-only host is then not the first error.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    listeners: list[Listener] = []
    errors: list[str] = []
    seen: set[tuple[int, object]] = set()
    for family, type_, proto, _, addr in infos:
        if (family, addr[0]) in seen:
            continue
        seen.add((family, addr[0]))
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and listeners:
                addr = (addr[0], listeners[0].sock.getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(_BACKLOG)
        except OSError as e:
            sock.close()
            errors.append(f"{addr[0]!s} port {addr[1]!s}: {e.strerror}")
            continue
        sock.setblocking(False)
        kind, address = _describe(sock)
        listeners.append(Listener(sock, kind, address))
    if not listeners:
        raise ConfigError("cannot listen on " + "; ".join(errors))
    return listeners


#: Connecting needs write permission on the socket file: by default only its owner may, as
#: every client that connects can read and (if writable) change the export.
DEFAULT_SOCKET_MODE = 0o600


def open_unix(path: str, mode: int = DEFAULT_SOCKET_MODE) -> Listener:
    """Listen on a Unix socket at ``path`` with permissions ``mode`` (whatever the umask).

    The socket is bound under a temporary name, given its mode and renamed into place after
    ``listen()``, so the path appears only once connections are accepted (a harness may poll
    for it) and never with looser permissions. A stale socket at ``path`` is replaced; any
    other kind of file is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(f"cannot use socket path {path!r}: {e.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"socket path {path!r} exists and is not a socket")
    directory, base = os.path.split(os.path.abspath(path))
    temp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    bind_path = temp if len(temp.encode()) < 108 else path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bind_path)
        sock.bind(bind_path)
        os.chmod(bind_path, mode)
        sock.listen(_BACKLOG)
        if bind_path != path:
            os.rename(bind_path, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(bind_path)
        raise ConfigError(f"cannot listen on socket {path!r}: {e.strerror}") from None
    sock.setblocking(False)
    return Listener(sock, "unix", path, path=path)


def systemd_listeners() -> list[Listener] | None:
    """Sockets passed by systemd-style activation (LISTEN_PID/LISTEN_FDS), or None.

    The variables are removed from the environment so a ``--run`` command does not think
    they are meant for it."""
    pid, fds = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or fds is None:
        return None
    try:
        if int(pid) != os.getpid():
            return None
        count = int(fds)
    except ValueError:
        raise ConfigError(f"invalid LISTEN_PID/LISTEN_FDS {pid!r}/{fds!r}") from None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if count < 1:
        return None
    listeners = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ConfigError(f"LISTEN_FDS: descriptor {fd} is not a socket: {e.strerror}")\
                from None
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        kind, address = _describe(sock)
        listeners.append(Listener(sock, kind, address))
    return listeners
