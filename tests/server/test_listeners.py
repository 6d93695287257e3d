"""Listening sockets: TCP on every family, Unix sockets appearing only when ready, systemd
socket activation."""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

import pytest

from nbdserve.errors import ConfigError
from nbdserve.listeners import open_tcp, open_unix, systemd_listeners


def test_tcp_all_addresses_share_one_port() -> None:
    listeners = open_tcp(None, 0)
    try:
        families = {ls.sock.family for ls in listeners}
        assert socket.AF_INET in families
        ports = {ls.sock.getsockname()[1] for ls in listeners}
        assert len(ports) == 1 and ports.pop() > 0
        for ls in listeners:
            if ls.sock.family == socket.AF_INET6:
                assert ls.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for ls in listeners:
            ls.close()


def test_tcp_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=re.escape("no.such.host.invalid")):
        open_tcp("no.such.host.invalid", 0)
    taken = open_tcp("127.0.0.1", 0)
    try:
        port = taken[0].sock.getsockname()[1]
        with pytest.raises(ConfigError, match=str(port)):
            open_tcp("127.0.0.1", port)
    finally:
        taken[0].close()


def test_unix_socket_replaces_stale_socket_and_is_removed(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    listener = open_unix(path)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)  # listening as soon as the path exists
    client.close()
    assert [p.name for p in tmp_path.iterdir()] == ["s.sock"], "no temporary name left"
    listener.close()
    assert not os.path.exists(path)


def test_unix_socket_refuses_to_replace_a_file(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(ConfigError, match="not a socket"):
        open_unix(str(path))
    assert path.read_text() == "data"


def test_systemd_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd_listeners() is None  # meant for another process
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"\0nbdserve-test-{os.getpid()}")
    sock.listen()
    saved = os.dup(3) if _fd_open(3) else None
    try:
        os.dup2(sock.fileno(), 3)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        (listener,) = systemd_listeners() or []
        assert listener.kind == "unix" and listener.path is None
        assert "LISTEN_FDS" not in os.environ, "not passed on to --run commands"
        listener.sock.detach()
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        sock.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_unix_socket_mode_ignores_umask(tmp_path: Path, mode: int) -> None:
    old = os.umask(0)
    try:
        listener = open_unix(str(tmp_path / "s.sock"), mode)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(listener.address).st_mode) == mode
    finally:
        listener.close()
