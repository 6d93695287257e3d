"""The servers under test: how to start each one on the shared image, and how to stop it."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Enough for nbdcopy's four connections plus the readiness probe.
MAX_CONNECTIONS = "8"

# What the qcow2 servers run when --rows is not given: the figures issue #6 asks about, and
# few enough cells that the full run stays short.
QCOW2_DEFAULT_ROWS = ("randread-4k-qd16", "randwrite-4k-qd16")


@dataclass(frozen=True, slots=True)
class Endpoint:
    uri: str
    unix_path: Path | None = None
    tcp_port: int | None = None


@dataclass(frozen=True, slots=True)
class Server:
    """One server configuration. ``peer`` groups configurations that count as one peer.

    ``image_format`` is also the comparison group: an nbdserve configuration is only compared
    with peers serving the same kind of image (nbdserve on qcow2 with qemu-nbd on qcow2), and
    over TCP with peers over TCP when the run has any (:func:`comparison_groups`).
    """

    key: str
    label: str
    argv: Callable[[Path, Endpoint, int], list[str]]  # (image, endpoint, size) -> command
    peer: str | None = None  # None: this is an nbdserve configuration
    tcp: bool = False
    in_memory: bool = False  # starts empty: the runner copies the image in first
    image_format: str = "raw"  # "raw" or "qcow2": which image the runner hands to argv
    default_rows: tuple[str, ...] | None = None  # rows run unless --rows names them; None: all

    @property
    def is_nbdserve(self) -> bool:
        return self.peer is None

    def runs_row(self, row: str, rows_named: bool) -> bool:
        """Whether this server runs *row*: every row the user named, else its default rows."""
        return rows_named or self.default_rows is None or row in self.default_rows


def nbdserve_command() -> list[str]:
    """The console script if installed, else the same entry point through this interpreter."""
    found = shutil.which("nbdserve")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from nbdserve.cli import main; sys.exit(main())"]


def _listen(ep: Endpoint) -> list[str]:
    if ep.tcp_port is not None:
        return ["-b", "127.0.0.1", "-p", str(ep.tcp_port)]
    return ["-k", str(ep.unix_path)]


def _nbdserve(fmt: str) -> Callable[[Path, Endpoint, int], list[str]]:
    def argv(image: Path, ep: Endpoint, size: int) -> list[str]:
        return [*nbdserve_command(), "-t", "-e", MAX_CONNECTIONS, *_listen(ep), "-f", fmt,
                str(image)]  # fmt: skip

    return argv


def _nbdserve_memory(image: Path, ep: Endpoint, size: int) -> list[str]:
    return [*nbdserve_command(), "-t", "-e", MAX_CONNECTIONS, *_listen(ep), f"memory:{size}"]


def _qemu_nbd(aio: str, fmt: str = "raw") -> Callable[[Path, Endpoint, int], list[str]]:
    def argv(image: Path, ep: Endpoint, size: int) -> list[str]:
        return [
            "qemu-nbd", "-t", "-e", MAX_CONNECTIONS, "-k", str(ep.unix_path), "-f", fmt,
            "--cache=writeback", f"--aio={aio}", str(image),
        ]  # fmt: skip

    return argv


def _nbdkit_listen(ep: Endpoint) -> list[str]:
    if ep.tcp_port is not None:
        return ["-i", "127.0.0.1", "-p", str(ep.tcp_port)]
    return ["-U", str(ep.unix_path)]


def _nbdkit_file(image: Path, ep: Endpoint, size: int) -> list[str]:
    return ["nbdkit", "-f", "--exit-with-parent", *_nbdkit_listen(ep), "file", str(image)]


PLUGIN = Path(__file__).with_name("peers") / "file_plugin.py"


def _nbdkit_python(image: Path, ep: Endpoint, size: int) -> list[str]:
    return [
        "nbdkit", "-f", "--exit-with-parent", "-U", str(ep.unix_path),
        "python", str(PLUGIN), f"file={image}",
    ]  # fmt: skip


SERVERS: tuple[Server, ...] = (
    Server("nbdserve", "nbdserve", _nbdserve("raw")),
    Server("nbdserve-tcp", "nbdserve TCP", _nbdserve("raw"), tcp=True),
    Server("nbdserve-memory", "nbdserve memory", _nbdserve_memory, in_memory=True),
    Server("qemu-threads", "qemu-nbd aio=threads", _qemu_nbd("threads"), peer="qemu-nbd"),
    Server("qemu-io_uring", "qemu-nbd aio=io_uring", _qemu_nbd("io_uring"), peer="qemu-nbd"),
    Server("nbdkit-file", "nbdkit file", _nbdkit_file, peer="nbdkit file"),
    # Over TCP loopback: when a run has it, nbdserve TCP is compared with it alone.
    Server("nbdkit-file-tcp", "nbdkit file TCP", _nbdkit_file, peer="nbdkit file", tcp=True),
    Server("nbdkit-python", "nbdkit python", _nbdkit_python, peer="nbdkit python"),
    # qcow2 group. On this machine qemu-nbd's threads mode wrote 4K QD16 to qcow2 1.2-1.8x
    # faster than io_uring and read within noise of it, so the plain key is threads; both
    # count as one peer in whichever mode was faster on the row, as on raw.
    Server("nbdserve-qcow2", "nbdserve qcow2", _nbdserve("qcow2"), image_format="qcow2",
           default_rows=QCOW2_DEFAULT_ROWS),
    Server("qemu-qcow2", "qemu-nbd qcow2 threads", _qemu_nbd("threads", "qcow2"),
           peer="qemu-nbd", image_format="qcow2", default_rows=QCOW2_DEFAULT_ROWS),
    Server("qemu-qcow2-io_uring", "qemu-nbd qcow2 io_uring", _qemu_nbd("io_uring", "qcow2"),
           peer="qemu-nbd", image_format="qcow2", default_rows=QCOW2_DEFAULT_ROWS),
)  # fmt: skip


class ServerStartError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def endpoint_for(server: Server, workdir: Path) -> Endpoint:
    if server.tcp:
        port = _free_port()
        return Endpoint(uri=f"nbd://127.0.0.1:{port}/", tcp_port=port)
    path = workdir / f"{server.key}.sock"
    return Endpoint(uri=f"nbd+unix:///?socket={path}", unix_path=path)


def _accepting(ep: Endpoint) -> bool:
    family = socket.AF_INET if ep.tcp_port is not None else socket.AF_UNIX
    address: str | tuple[str, int] = (
        ("127.0.0.1", ep.tcp_port) if ep.tcp_port is not None else str(ep.unix_path)
    )
    if ep.unix_path is not None and not ep.unix_path.exists():
        return False
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def _server_env() -> dict[str, str]:
    # Let Python servers cache their bytecode: recompiling every module at each of the many
    # starts costs about a second each, which is start-up, not serving.
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def running(
    server: Server, image: Path, size: int, workdir: Path, timeout: float = 30.0
) -> Iterator[tuple[subprocess.Popen[bytes], Endpoint]]:
    """Start *server* on *image*, wait until it accepts connections, stop it on exit."""
    ep = endpoint_for(server, workdir)
    if ep.unix_path is not None:
        ep.unix_path.unlink(missing_ok=True)
    log = workdir / f"{server.key}.log"
    argv = server.argv(image, ep, size)
    with log.open("ab") as sink:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=_server_env()
            )
        except OSError as exc:
            raise ServerStartError(f"{server.label}: cannot run {argv[0]}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout
        while not _accepting(ep):
            if proc.poll() is not None:
                raise ServerStartError(
                    f"{server.label} exited with status {proc.returncode}:\n{_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise ServerStartError(f"{server.label} did not accept within {timeout:.0f}s")
            time.sleep(0.02)
        yield proc, ep
    finally:
        _stop(proc)
        if ep.unix_path is not None:
            ep.unix_path.unlink(missing_ok=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def comparison_groups(servers: Sequence[Server]) -> dict[str, str]:
    """Server key -> comparison group: the image format, and for TCP configurations of a
    format that some peer in the run serves over TCP, that format over TCP."""
    tcp_formats = {s.image_format for s in servers if s.tcp and not s.is_nbdserve}
    return {s.key: s.image_format + (" over TCP" if s.tcp and s.image_format in tcp_formats
                                     else "") for s in servers}
