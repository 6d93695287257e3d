"""Fixtures for the interop suite: images on disk and servers started the qemu-nbd way.

``NBD_SERVER=qemu-nbd`` runs the whole suite against qemu-nbd, which proves the tests
themselves; the default runs it against nbdserve. Tests of nbdserve-only features take the
``nbdserve_only`` fixture and are skipped in the qemu-nbd run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.interop._server import (
    ImageFactory,
    MiB,
    RunningServer,
    ServeFactory,
    ServerKind,
    Transport,
    free_tcp_port,
    server_kind,
    start_server,
)

DEFAULT_IMAGE_SIZE = 16 * MiB


@pytest.fixture(scope="session")
def kind() -> ServerKind:
    return server_kind()


@pytest.fixture
def nbdserve_only(kind: ServerKind) -> None:
    if kind != "nbdserve":
        pytest.skip("nbdserve-only feature; this run targets qemu-nbd")


@pytest.fixture
def make_image(tmp_path: Path) -> ImageFactory:
    """Create a sparse raw image, optionally with chunks of data written at offsets."""
    counter = 0

    def make(size: int = DEFAULT_IMAGE_SIZE, data: dict[int, bytes] | None = None,
             name: str | None = None) -> Path:
        nonlocal counter
        counter += 1
        path = tmp_path / (name or f"disk{counter}.img")
        with open(path, "wb") as f:
            f.truncate(size)
            for offset, chunk in (data or {}).items():
                f.seek(offset)
                f.write(chunk)
        return path

    return make


@pytest.fixture
def serve(tmp_path: Path, kind: ServerKind) -> Iterator[ServeFactory]:
    """Start servers with qemu-nbd-style flags; every one is stopped (and checked) at the end.

    ``serve(*args, transport="unix", persistent=True, shared=0, export_name="")`` adds the
    listening, ``-t``, ``-e`` and ``-x`` flags to ``args`` (typically ``-f raw IMAGE``).
    """
    servers: list[RunningServer] = []
    # A short directory: Unix socket paths are limited to 107 bytes.
    sockdir = tmp_path

    def start(*args: str, transport: Transport = "unix", persistent: bool = True,
              shared: int | None = 0, export_name: str = "") -> RunningServer:
        flags: list[str] = []
        socket_path: Path | None = None
        port: int | None = None
        if transport == "unix":
            socket_path = sockdir / f"nbd{len(servers)}.sock"
            flags += ["-k", str(socket_path)]
        else:
            port = free_tcp_port()
            flags += ["-b", "127.0.0.1", "-p", str(port)]
        if persistent:
            flags.append("-t")
        if shared is not None:
            flags += ["-e", str(shared)]
        if export_name:
            flags += ["-x", export_name]
        server = start_server(kind, [*flags, *args], workdir=tmp_path,
                              socket_path=socket_path, port=port, export_name=export_name)
        servers.append(server)
        return server

    yield start
    errors = []
    for server in servers:
        try:
            server.stop()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n\n".join(errors)


@pytest.fixture
def start_raw(tmp_path: Path, kind: ServerKind) -> Iterator[Callable[..., RunningServer]]:
    """Start a server with exactly the given arguments (for storage-daemon-style command lines)."""
    servers: list[RunningServer] = []

    def start(args: list[str], *, socket_path: Path | None = None, port: int | None = None,
              export_name: str = "") -> RunningServer:
        server = start_server(kind, args, workdir=tmp_path, socket_path=socket_path,
                              port=port, export_name=export_name)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> Transport:
    value: Transport = request.param
    return value


@pytest.fixture
def image(make_image: ImageFactory) -> Path:
    return make_image()


@pytest.fixture
def server(serve: ServeFactory, image: Path) -> RunningServer:
    """A writable raw export of a fresh 16 MiB sparse image over a Unix socket."""
    return serve("-f", "raw", str(image))


def pytest_report_header() -> str:
    return f"interop server: {os.environ.get('NBD_SERVER', 'nbdserve')}"
