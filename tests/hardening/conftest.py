"""Fixtures shared by the hardening tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._certs import Creds, make_creds
from ._server import MiB, Server, Servers, target


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
def serve(tmp_path: Path, sockdir: Path) -> Iterator[Servers]:
    """``serve(*args, persistent=True, shared=0)`` starts a server for this test; a server
    that died under the test's abuse fails it."""
    servers = Servers(tmp_path, sockdir)
    yield servers
    servers.finish()


@pytest.fixture(scope="module")
def module_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "disk.img"
    with path.open("wb") as f:
        f.truncate(64 * MiB)
    return path


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, module_image: Path) -> Iterator[Server]:
    """One writable raw 64 MiB export for a whole module (server starts cost ~1 s each)."""
    d = Path(tempfile.mkdtemp(prefix="nbdh-"))
    servers = Servers(tmp_path_factory.mktemp("shared"), d)
    yield servers("-f", "raw", str(module_image))
    servers.finish()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(shared_server: Server) -> Iterator[Server]:
    """The module's shared server, checked alive before and after each test."""
    assert shared_server.alive(), f"server died earlier:\n{shared_server.log_tail()}"
    yield shared_server
    assert shared_server.alive(), f"server died:\n{shared_server.log_tail()}"
