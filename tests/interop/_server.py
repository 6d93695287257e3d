"""Start and stop an NBD server process (nbdserve or qemu-nbd) for the interop tests.

Both servers take the same qemu-nbd-style flags, so one helper drives either; the environment
variable ``NBD_SERVER`` picks which. Readiness is observed (the socket file, and
``/proc/net/{unix,tcp}``) rather than probed by connecting: a probe connection would count as
the first client, and a server started without ``-t`` exits when its first client leaves.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ServerKind = Literal["nbdserve", "qemu-nbd"]
Transport = Literal["unix", "tcp"]

MiB = 1 << 20

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

_UNIX_LISTENING_FLAG = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column
_TCP_LISTEN_STATE = "0A"


def server_kind() -> ServerKind:
    """The server the interop suite runs against, from ``NBD_SERVER`` (default nbdserve)."""
    kind = os.environ.get("NBD_SERVER", "nbdserve")
    if kind == "nbdserve":
        return "nbdserve"
    if kind == "qemu-nbd":
        return "qemu-nbd"
    raise ValueError(f"NBD_SERVER must be 'nbdserve' or 'qemu-nbd', not {kind!r}")


def nbdserve_argv() -> list[str]:
    """How to run this checkout's nbdserve: exactly what the ``nbdserve`` console script runs
    (``nbdserve.cli:main``), with the interpreter running pytest, installed or not."""
    launcher = ("import sys; sys.argv[0] = 'nbdserve'; "
                "from nbdserve.cli import main; sys.exit(main())")
    return [sys.executable, "-c", launcher]


def server_argv(kind: ServerKind) -> list[str]:
    return nbdserve_argv() if kind == "nbdserve" else ["qemu-nbd"]


def subprocess_env() -> dict[str, str]:
    """Environment for servers and clients: this checkout importable, Debian tools found first.

    /usr/bin leads PATH because nbdsh runs ``python3 -m nbd`` and only Debian's python3 has the
    libnbd module.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin", env.get("PATH", "")])
    return env


def free_tcp_port() -> int:
    """A loopback port that was free a moment ago (the usual, small, race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unix_socket_ready(path: Path) -> bool:
    """True once clients can connect to the socket file at ``path``.

    qemu-nbd binds the path itself, so /proc/net/unix shows it, listening or not yet.
    nbdserve binds a temporary name and renames it into place once it accepts (so /proc
    shows the old name): there, the socket file's existence is the signal.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    wanted = str(path)
    with open("/proc/net/unix") as f:
        next(f)  # header
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == wanted:
                return bool(int(fields[3], 16) & _UNIX_LISTENING_FLAG)
    return True


def tcp_port_listening(port: int) -> bool:
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].endswith(wanted) and fields[3] == _TCP_LISTEN_STATE:
                    return True
    return False


@dataclass
class RunningServer:
    """A server subprocess, where it listens, and its captured stderr."""

    kind: ServerKind
    argv: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path
    socket_path: Path | None = None
    port: int | None = None
    export_name: str = ""
    stopped: bool = field(default=False)

    def uri(self, export: str | None = None) -> str:
        """The NBD URI of an export (default: the one this server was started with)."""
        name = self.export_name if export is None else export
        if self.socket_path is not None:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"{shlex.join(self.argv)}\n--- server stderr ---\n{self.stderr()}"

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            rc = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"server did not exit within {timeout} s\n{self.describe()}"
            ) from None
        self.stopped = True
        return rc

    def stop(self) -> None:
        """SIGTERM, then require a clean exit (status 0) within STOP_TIMEOUT."""
        if self.stopped:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        rc = self.wait_exit()
        assert rc == 0, f"server exited with status {rc} after SIGTERM\n{self.describe()}"


def start_server(
    kind: ServerKind,
    args: list[str],
    *,
    workdir: Path,
    socket_path: Path | None = None,
    port: int | None = None,
    export_name: str = "",
) -> RunningServer:
    """Run ``server args`` and wait until it listens on socket_path or port.

    ``args`` must already contain the listening flags (``-k``/``-p``/``--nbd-server``); the
    caller passes the same location here so readiness can be observed.
    """
    assert (socket_path is None) != (port is None), "give exactly one of socket_path, port"
    argv = [*server_argv(kind), *args]
    log_path = workdir / f"server-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=subprocess_env(),
        )
    server = RunningServer(
        kind=kind,
        argv=argv,
        process=process,
        log_path=log_path,
        socket_path=socket_path,
        port=port,
        export_name=export_name,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        ready = (
            unix_socket_ready(socket_path)
            if socket_path is not None
            else tcp_port_listening(port)  # type: ignore[arg-type]
        )
        if ready:
            return server
        if process.poll() is not None:
            server.stopped = True
            raise AssertionError(
                f"server exited with status {process.returncode} before listening\n"
                f"{server.describe()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            server.stopped = True
            raise AssertionError(
                f"server not listening after {START_TIMEOUT} s\n{server.describe()}"
            )
        time.sleep(0.02)


ImageFactory = Callable[..., Path]
ServeFactory = Callable[..., RunningServer]
