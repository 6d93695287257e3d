"""Running the real NBD client tools, with failures that show everything needed to debug."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.interop._server import RunningServer, subprocess_env

CLIENT_TIMEOUT = 60.0
DEBIAN_PYTHON = "/usr/bin/python3"  # the only interpreter with libnbd's `nbd` module
INTEROP_DIR = Path(__file__).resolve().parent


def run(
    argv: list[str],
    *,
    server: RunningServer | None = None,
    expect_rc: int | None = 0,
    timeout: float = CLIENT_TIMEOUT,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client command; unless expect_rc is None, insist on that exit status.

    On a mismatch (or a timeout) the assertion message carries the command, its output and
    the server's stderr, so a failure says whose fault it is.
    """
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=subprocess_env(),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"client timed out after {timeout} s: {argv}\n{_server_part(server)}"
        ) from e
    if expect_rc is not None and result.returncode != expect_rc:
        raise AssertionError(
            f"{argv}\nexited {result.returncode}, expected {expect_rc}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
            f"{_server_part(server)}"
        )
    return result


def _server_part(server: RunningServer | None) -> str:
    return "" if server is None else f"--- server ---\n{server.describe()}"


def run_json(argv: list[str], *, server: RunningServer | None = None) -> Any:
    out = run(argv, server=server).stdout
    return json.loads(out)


def qemu_io(server: RunningServer, *commands: str, uri: str | None = None,
            expect_rc: int | None = 0, read_only: bool = False) -> str:
    """Run qemu-io commands against the server's export and return its output.

    qemu-io keeps going after a failed command, so a failed pattern check or I/O error is
    also caught from the output text, whatever the exit status.
    """
    argv = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        argv += ["-c", command]
    argv.append(uri or server.uri())
    result = run(argv, server=server, expect_rc=expect_rc)
    output = result.stdout + result.stderr
    if expect_rc == 0:
        for marker in ("Pattern verification failed", "failed:", "error"):
            assert marker not in output, f"{argv}\n{output}\n{server.describe()}"
    return output


def nbdinfo_json(server: RunningServer, *options: str, uri: str | None = None) -> Any:
    return run_json(["nbdinfo", "--json", *options, uri or server.uri()], server=server)


def libnbd_python(script: str, *args: str, server: RunningServer | None = None,
                  expect_rc: int | None = 0,
                  timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a script from tests/interop with Debian's python3 (which has libnbd's module)."""
    return run([DEBIAN_PYTHON, str(INTEROP_DIR / script), *args], server=server,
               expect_rc=expect_rc, timeout=timeout)
