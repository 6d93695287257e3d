"""Who can reach the server: Unix socket permissions, and a warning for open TCP exports."""

from __future__ import annotations

import functools
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from . import _nbdraw as nbd
from ._server import NBDSERVE, env, unix_listening

pytestmark = pytest.mark.usefixtures("nbdserve_only")

WARNING = "non-loopback address without TLS"


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 20
    while not ready():
        assert proc.poll() is None, f"{what}: server exited {proc.returncode}"
        assert time.monotonic() < deadline, f"{what}: not listening"
        time.sleep(0.02)


def test_unix_socket_is_not_open_to_other_users(sockdir: Path) -> None:
    # Connecting needs write permission on the socket file. Even with umask 000 the socket
    # must not let every local user in: they could read and change the export.
    sock = sockdir / "s.sock"
    proc = subprocess.Popen(
        [*NBDSERVE, "-t", "-k", str(sock), "memory:1M"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), umask=0,
    )  # fmt: skip
    try:
        _wait(lambda: unix_listening(sock), proc, "unix")
        mode = stat.S_IMODE(sock.stat().st_mode)
        assert mode & 0o007 == 0, f"socket mode {mode:o} lets any local user connect"
        nbd.assert_serves(sock, offset=0)  # the owner still can
    finally:
        proc.terminate()
        proc.wait(15)


def _tcp_listening(port: int) -> bool:
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            if any(line.split()[1].endswith(want) and line.split()[3] == "0A" for line in f):
                return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_writable_export_on_a_public_address_without_tls_warns(tmp_path: Path) -> None:
    cases = {
        "public-writable": (["-b", "0.0.0.0"], True),
        "public-read-only": (["-b", "0.0.0.0", "-r"], False),
    }
    procs = {}
    for name, (flags, _) in cases.items():  # started together: start-up costs ~1.5 s each
        port = _free_port()
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*NBDSERVE, "-t", "-p", str(port), *flags, "memory:1M"],
                stdout=out, stderr=out, text=True, env=env(),
            )  # fmt: skip
        procs[name] = (proc, port, log)
    try:
        for name, (proc, port, _) in procs.items():
            _wait(functools.partial(_tcp_listening, port), proc, name)
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
        for proc, _, _ in procs.values():
            proc.wait(15)
    for name, (_, warns) in cases.items():
        text = procs[name][2].read_text()
        assert (WARNING in text) == warns, f"{name}:\n{text}"
    assert all(proc.returncode == 0 for proc, _, _ in procs.values())
