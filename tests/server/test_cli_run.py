"""The ``nbdserve`` command end to end, in subprocesses, with real clients: captive mode,
stdin/stdout and socket activation, TCP, signals, pid file and qemu-nbd's lifetime rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

NBDSERVE = [sys.executable, "-m", "nbdserve"]
#: libnbd's Python module only exists for Debian's interpreter.
DEBIAN_PYTHON = "/usr/bin/python3"


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NBDSERVE, *argv], capture_output=True, text=True, timeout=timeout)


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)


def test_captive_mode_runs_nbdinfo() -> None:
    proc = run("--run", 'nbdinfo --json "$uri"', "-x", "disk", "-D", "scratch", "memory:1M")
    assert proc.returncode == 0, proc.stderr
    (export,) = json.loads(proc.stdout)["exports"]
    assert export["export-name"] == "disk" and export["export-size"] == 1 << 20
    assert export["description"] == "scratch" and export["is_read_only"] is False


def test_captive_mode_environment_and_exit_status() -> None:
    proc = run("--run", 'echo "$uri|$nbd|$unixsocket|$port|$exportname"; exit 7',
               "-x", "a b", "null:4K")
    assert proc.returncode == 7
    uri, nbd, sock, port, name = proc.stdout.strip().split("|")
    assert uri == nbd == f"nbd+unix:///a%20b?socket={sock}"
    assert sock.endswith("nbd.sock") and port == "" and name == "a b"
    assert not os.path.exists(sock), "the private socket is removed"


def test_captive_mode_over_tcp_with_qemu_img(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x5a" * 65536 + bytes(65536))
    proc = run("--run", 'qemu-img info --output=json -f raw "$uri" && echo "port=$port"',
               "-b", "127.0.0.1", "-p", "0", "-f", "raw", "-r", str(image))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
    assert info["virtual-size"] == 131072
    assert int(proc.stdout.rsplit("port=", 1)[1]) > 0


def test_stdin_mode_with_libnbd_connect_command() -> None:
    script = (
        "import nbd, sys\n"
        "h = nbd.NBD()\n"
        "h.connect_command(sys.argv[1:])\n"
        "h.pwrite(b'stdin works', 4096)\n"
        "print(h.get_size(), h.pread(11, 4096).decode())\n"
        "h.shutdown()\n"
    )
    proc = subprocess.run([DEBIAN_PYTHON, "-c", script, *NBDSERVE, "--stdin", "memory:1M"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1048576", "stdin", "works"]


def test_socket_activation_with_nbdinfo() -> None:
    proc = subprocess.run(["nbdinfo", "--size", "--", "[", *NBDSERVE, "memory:3M", "]"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(3 << 20)


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    sock, pid_file = tmp_path / "s.sock", tmp_path / "nbd.pid"
    proc = subprocess.Popen([*NBDSERVE, "-t", "-k", str(sock), "--pid-file", str(pid_file),
                             "memory:1M"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock, proc)
        assert pid_file.read_text().strip() == str(proc.pid)
        check = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                               capture_output=True, text=True, timeout=30)
        assert check.stdout.strip() == str(1 << 20)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert not sock.exists() and not pid_file.exists()
    lines = [json.loads(line) for line in stderr.splitlines()]
    (summary,) = [x for x in lines if x["event"] == "connection closed"]
    assert summary["reason"] == "disconnect" and summary["structured"] is True


def test_exits_after_first_client_without_persistent(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([*NBDSERVE, "-k", str(sock), "-f", "raw", "memory:1M"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock, proc)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k",
                        f"nbd+unix:///?socket={sock}"], check=True, capture_output=True,
                       timeout=30)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert not sock.exists()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_format(fmt: str) -> None:
    proc = run("--log-format", fmt, "--run", "true", "null:1M")
    assert proc.returncode == 0
    first = proc.stderr.splitlines()[0]
    if fmt == "json":
        assert json.loads(first)["event"] == "listening"
    else:
        assert "listening" in first and not first.startswith("{")


def test_snapshot_mode_never_modifies_the_image(tmp_path: Path) -> None:
    image = tmp_path / "base.raw"
    original = b"\x42" * 65536 + bytes(3 * 65536)
    image.write_bytes(original)
    proc = run("-s", "-A", "-f", "raw", "--run",
               'qemu-io -f raw -c "write -P 0x77 65536 64k" -c "read -P 0x77 65536 64k" '
               '-c "read -P 0x42 0 64k" "$uri" && nbdinfo --map=qemu:allocation-depth "$uri"',
               str(image))
    assert proc.returncode == 0, proc.stderr
    assert image.read_bytes() == original
    depth = [line.split()[:3] for line in proc.stdout.splitlines() if "read" not in line
             and "wrote" not in line and "ops" not in line]
    # The write landed in the overlay (depth 1); the rest is read from the image (depth 2).
    assert ["65536", "65536", "1"] in depth and ["0", "65536", "2"] in depth


async def test_stdin_mode_over_pipes() -> None:
    # Pipes, not a socket: the stream transport carries the connection.
    from .nbdclient import NBDClient

    proc = await trio.lowlevel.open_process(
        [*NBDSERVE, "--stdin", "memory:1M"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        stream = trio.StapledStream(proc.stdin, proc.stdout)
        with trio.fail_after(30):
            client = await NBDClient.handshake(stream)
            await client.write(512, b"through a pipe")
            assert await client.read(512, 14) == b"through a pipe"
            await client.disconnect()
            assert await proc.wait() == 0
    finally:
        proc.kill()
        await proc.wait()
