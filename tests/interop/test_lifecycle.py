"""Process behaviour shared with qemu-nbd: lifetime without -t, connection limits, pid files,
SIGTERM, and clear errors for bad command lines."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop._server import (
    ImageFactory,
    MiB,
    RunningServer,
    ServeFactory,
    ServerKind,
    free_tcp_port,
    server_argv,
    subprocess_env,
)
from tests.interop._tools import qemu_io, run


def test_without_persistent_server_exits_after_first_client(serve: ServeFactory,
                                                            image: Path) -> None:
    server = serve("-f", "raw", str(image), persistent=False, shared=None)
    qemu_io(server, "write -P 0x61 0 64k")
    assert server.wait_exit() == 0, server.describe()
    assert image.read_bytes()[:65536] == b"\x61" * 65536


def test_persistent_server_serves_clients_in_turn(serve: ServeFactory, image: Path) -> None:
    server = serve("-f", "raw", str(image), shared=1)  # -e 1: one client at a time
    for n in range(1, 6):
        qemu_io(server, f"write -P {n} {n}M 4k", f"read -P {n} {n}M 4k")
    for n in range(1, 6):
        qemu_io(server, f"read -P {n} {n}M 4k")


def test_sigterm_with_client_connected_exits_cleanly(serve: ServeFactory, image: Path) -> None:
    server = serve("-f", "raw", str(image))
    client = subprocess.Popen(  # holds a connection open: qemu-io waits for commands on stdin
        ["qemu-io", "-f", "raw", server.uri()], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"write -P 0x3c 0 4k\n")
        client.stdin.flush()
        # qemu-io prints "wrote ..." once the server has acknowledged the write.
        seen = b""
        while b"wrote 4096/4096" not in seen:
            line = client.stdout.readline()
            assert line, f"qemu-io ended early: {seen!r}\n{server.describe()}"
            seen += line
        server.stop()  # asserts exit status 0 within the stop timeout
    finally:
        client.kill()
        client.wait()
    assert image.read_bytes()[:4096] == b"\x3c" * 4096


def test_pid_file_names_the_server(serve: ServeFactory, image: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    server = serve("-f", "raw", "--pid-file", str(pid_file), str(image))
    # The file appears once the socket listens (as with qemu-nbd: whoever waits for it can
    # connect at once), so a moment after the socket takes connections.
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        assert time.monotonic() < deadline, f"no pid file\n{server.describe()}"
        time.sleep(0.01)
    assert int(pid_file.read_text().strip()) == server.process.pid


@pytest.mark.parametrize(("args", "named"), [
    (["-f", "raw", "no-such-image.img"], "no-such-image.img"),
    (["-f", "raw", "--discard=sometimes", "IMAGE"], "sometimes"),
    (["-f", "raw", "--cache=fast", "IMAGE"], "fast"),
    (["-f", "raw", "-p", "notaport", "IMAGE"], "notaport"),
])
def test_bad_arguments_give_one_clear_error(kind: ServerKind, make_image: ImageFactory,
                                            tmp_path: Path, args: list[str],
                                            named: str) -> None:
    image = make_image(MiB)
    argv = [*server_argv(kind), *(str(image) if a == "IMAGE" else a for a in args)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path,
                            env=subprocess_env(), stdin=subprocess.DEVNULL)
    assert result.returncode in (1, 2), result
    assert named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_export_survives_a_client_that_disconnects_mid_handshake(serve: ServeFactory,
                                                                 image: Path) -> None:
    server = serve("-f", "raw", str(image))
    assert server.socket_path is not None
    for cut in (0, 4, 16):  # bytes of the greeting read before hanging up
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(os.fspath(server.socket_path))
            if cut:
                s.recv(cut)
    run(["nbdinfo", "--size", server.uri()], server=server)


def test_default_bind_and_limit_serve_loopback_clients_in_turn(
    start_raw: Callable[..., RunningServer], image: Path
) -> None:
    # No -b (all addresses: nbdserve listens on IPv4 and IPv6) and no -e (one client at a
    # time). Clients one after another on 127.0.0.1 must all be served, whichever listener
    # the connection slot was last handed to.
    port = free_tcp_port()
    server = start_raw(["-t", "-p", str(port), "-f", "raw", str(image)], port=port)
    for _ in range(3):
        out = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], server=server, timeout=20)
        assert out.stdout.strip() == str(16 * MiB)


def test_client_over_the_limit_waits_for_a_free_slot(serve: ServeFactory, image: Path) -> None:
    # With -e 1 a second client is not refused: it waits (in the listen backlog, as with
    # qemu-nbd) and is served once the first one leaves.
    server = serve("-f", "raw", str(image), shared=1)
    first = subprocess.Popen(["qemu-io", "-f", "raw", server.uri()], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=subprocess_env())
    second: subprocess.Popen[str] | None = None
    try:
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write(b"write -P 0x2b 0 4k\n")
        first.stdin.flush()
        while b"wrote 4096/4096" not in (line := first.stdout.readline()):
            assert line, f"qemu-io ended early\n{server.describe()}"
        second = subprocess.Popen(["nbdinfo", "--size", server.uri()], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=subprocess_env())
        first.stdin.write(b"quit\n")
        first.stdin.flush()
        assert first.wait(30) == 0
        out, err = second.communicate(timeout=30)
        assert second.returncode == 0, f"{err}\n{server.describe()}"
        assert out.strip() == str(16 * MiB)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    qemu_io(server, "read -P 0x2b 0 4k")


def test_socket_activation_by_libnbd_tools(kind: ServerKind, make_image: ImageFactory,
                                           tmp_path: Path) -> None:
    # `nbdinfo/nbdcopy -- [ SERVER ... ]` start the server themselves and hand it a
    # listening socket through LISTEN_FDS (systemd socket activation).
    image = make_image(8 * MiB, {MiB: b"\x17" * MiB})
    server = [*server_argv(kind), "-f", "raw", str(image)]
    size = run(["nbdinfo", "--size", "--", "[", *server, "]"]).stdout.strip()
    assert size == str(8 * MiB)
    out = tmp_path / "activated-copy.img"
    run(["nbdcopy", "--", "[", *server, "]", str(out)])
    assert out.read_bytes() == image.read_bytes()
