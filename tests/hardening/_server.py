"""Run nbdserve as a user would (a subprocess driven by its CLI) and watch it.

Readiness comes from ``/proc/net/unix`` (the socket is listening), not from a probe connection:
a probe would count as a client, and with ``-e N`` it would take a slot.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
_UNIX_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column

# The console script may not be on PATH in every environment; this is the same entry point.
NBDSERVE = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'nbdserve'; from nbdserve.cli import main; sys.exit(main())",
]


def target() -> str:
    """``NBD_SERVER=qemu-nbd`` runs the qemu-nbd-compatible tests against qemu-nbd instead,
    which proves the tests themselves (the same switch as tests/interop)."""
    return os.environ.get("NBD_SERVER", "nbdserve")


LIBNBD_PYTHON = "/usr/bin/python3"  # only Debian's python3 can import libnbd's module


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), e.get("PYTHONPATH")) if p)
    return e


def unix_listening(path: Path) -> bool:
    """``path`` is a socket that accepts connections.

    nbdserve creates the file only once it accepts (it binds a temporary name and renames
    it), so the file's existence is enough; qemu-nbd binds first, so it must also be listed as
    listening in /proc/net/unix.
    """
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return False
    except FileNotFoundError:
        return False
    if target() == "nbdserve":
        return True
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & _UNIX_LISTENING:
                return True
    return False


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path
    stopped: bool = False  # stopped on purpose by the test, as opposed to died

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait; SIGKILL (and fail) if it does not exit within ``timeout``."""
        self.stopped = True
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"server ignored signal {sig} for {timeout}s\n{self.log_tail()}"
                ) from None
        return self.proc.returncode


def start(args: list[str], sock: Path, log: Path) -> Server:
    """Start ``nbdserve ARGS`` (which must make it listen on ``sock``) and wait until ready."""
    argv = [*(NBDSERVE if target() == "nbdserve" else [target()]), *args]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env())
    server = Server(proc, sock, log)
    deadline = time.monotonic() + START_TIMEOUT
    while not unix_listening(sock):
        if not server.alive():
            raise AssertionError(
                f"nbdserve {' '.join(args)} exited with {proc.returncode}:\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise AssertionError(f"nbdserve did not listen on {sock}\n{server.log_tail()}")
        time.sleep(0.02)
    return server


class Servers:
    """Starts ``nbdserve -k SOCK [-t] [-e N] ARGS`` and remembers them for the health check."""

    def __init__(self, logdir: Path, sockdir: Path) -> None:
        self.logdir, self.sockdir = logdir, sockdir
        self.servers: list[Server] = []

    def __call__(self, *args: str, persistent: bool = True, shared: int | None = 0) -> Server:
        n = len(self.servers)
        sock = self.sockdir / f"s{n}.sock"
        flags = ["-k", str(sock)]
        flags += ["-t"] if persistent else []
        flags += ["-e", str(shared)] if shared is not None else []
        server = start([*flags, *args], sock, self.logdir / f"server{n}.log")
        self.servers.append(server)
        return server

    def daemon(self, *args: str, sock: Path) -> Server:
        """Start with exactly ``args`` (the storage-daemon dialect names its own socket)."""
        server = start(list(args), sock, self.logdir / f"server{len(self.servers)}.log")
        self.servers.append(server)
        return server

    def finish(self) -> None:
        """Every server the test did not stop itself must still be running; then stop all."""
        died = [s for s in self.servers if not s.stopped and not s.alive()]
        running = [s for s in self.servers if s.alive()]
        for s in running:  # signal all first: they shut down in parallel
            s.proc.terminate()
        for s in running:
            s.stop()
        assert not died, "server died during the test:\n" + "\n".join(
            f"exit {s.proc.returncode}:\n{s.log_tail()}" for s in died
        )
