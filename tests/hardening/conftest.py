"""Fixtures shared by the hardening tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ._certs import Creds, make_creds
from ._server import Server, start, target

MiB = 1 << 20
Serve = Callable[..., Server]


@pytest.fixture(scope="session")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    return make_creds(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def nbdserve_only() -> None:
    if target() != "nbdserve":
        pytest.skip(f"nbdserve-only feature; this run targets {target()}")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="nbdh-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse 64 MiB raw image."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(64 * MiB)
    return path


@pytest.fixture
def serve(tmp_path: Path, sockdir: Path) -> Iterator[Serve]:
    """``serve(*args, persistent=True, shared=0)`` starts ``nbdserve -k SOCK [-t] [-e N] ARGS``.

    At teardown every server the test did not stop itself must still be running (a server
    that died under a test's abuse fails the test), and is then stopped.
    """
    servers: list[Server] = []

    def run(*args: str, persistent: bool = True, shared: int | None = 0) -> Server:
        sock = sockdir / f"s{len(servers)}.sock"
        flags = ["-k", str(sock)]
        flags += ["-t"] if persistent else []
        flags += ["-e", str(shared)] if shared is not None else []
        server = start([*flags, *args], sock, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        return server

    yield run
    died = [s for s in servers if not s.stopped and not s.alive()]
    for s in servers:
        if s.alive():
            s.stop()
    assert not died, "server died during the test:\n" + "\n".join(
        f"exit {s.proc.returncode}:\n{s.log_tail()}" for s in died
    )
