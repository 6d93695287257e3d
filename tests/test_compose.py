"""Structural checks of docker-compose.yml, the Dockerfile and .dockerignore.

No Docker engine runs where the tests run, so nothing here builds or starts a container.
What can be checked is checked: the services and how they depend on each other, the volume
and the port, that the server's command line is one nbdserve really accepts (parsed by
nbdserve's own argparse parser, and every flag found in ``nbdserve --help``), and that the
image installs every tool the services call.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the test extras

from nbdserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PORT = 10809
VOLUME = "images"
MOUNT = "/images"
TOOL_PACKAGES = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "nbdinfo": "libnbd-bin",
                 "nbdcopy": "libnbd-bin"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


@pytest.fixture(scope="module")
def help_text() -> str:
    launcher = ("import sys; sys.argv[0] = 'nbdserve'; "
                "from nbdserve.cli import main; sys.exit(main())")
    result = subprocess.run([sys.executable, "-c", launcher, "--help"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def command_text(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def test_services_and_their_order(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"image-init", "server", "client"}
    assert services["server"]["depends_on"] == {
        "image-init": {"condition": "service_completed_successfully"}}
    assert services["client"]["depends_on"] == {"server": {"condition": "service_healthy"}}
    # One image, built from the Dockerfile next to the compose file.
    for service in services.values():
        assert service["build"] == "."
        assert service["image"] == "nbdserve:latest"


def test_volume_holds_the_exported_image(compose: dict[str, Any],
                                         services: dict[str, dict[str, Any]]) -> None:
    assert VOLUME in compose["volumes"]
    for name in ("image-init", "server"):
        assert f"{VOLUME}:{MOUNT}" in services[name]["volumes"], name
    init = command_text(services["image-init"])
    created = re.search(r"qemu-img create -f raw (\S+) (\d+[KMGT]?)", init)
    assert created, init
    ns = build_parser().parse_args(services["server"]["command"][1:])
    assert ns.file == created.group(1)
    assert ns.file.startswith(MOUNT + "/")
    # Created only when missing: restarting the stack keeps the data.
    assert f"test -e {ns.file} ||" in init


def test_server_publishes_the_nbd_port(services: dict[str, dict[str, Any]]) -> None:
    server = services["server"]
    assert f"{PORT}:{PORT}" in server["ports"]
    ns = build_parser().parse_args(server["command"][1:])
    assert ns.port == PORT
    assert ns.bind == "0.0.0.0"  # reachable from the client container
    assert ns.persistent, "without --persistent the server exits after the first client"
    assert ns.shared == 0, "the health check and the client connect alongside each other"
    assert ns.format == "raw"
    assert server["stop_signal"] == "SIGTERM"


def test_server_command_uses_only_real_nbdserve_flags(services: dict[str, dict[str, Any]],
                                                      help_text: str) -> None:
    command: list[str] = services["server"]["command"]
    assert command[0] == "nbdserve"
    flags = [arg.split("=", 1)[0] for arg in command[1:] if arg.startswith("-")]
    assert flags, command
    for flag in flags:
        assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", help_text, re.M), flag
    # argparse accepts it as a whole (an unknown flag or bad value exits with status 2).
    build_parser().parse_args(command[1:])


def test_client_and_healthcheck_talk_to_the_server(services: dict[str, dict[str, Any]]) -> None:
    server = services["server"]
    ns = build_parser().parse_args(server["command"][1:])
    health = server["healthcheck"]["test"]
    assert health[0] == "CMD" and health[1] == "nbdinfo"
    assert f"nbd://localhost:{PORT}/{ns.export_name}" in health
    client = command_text(services["client"])
    assert f"nbd://server:{PORT}/{ns.export_name}" in client
    assert "qemu-img info" in client and "nbdinfo" in client
    assert "set -e" in client or client.startswith("sh -ec"), "a failed check must fail"


def test_dockerfile_installs_everything_the_services_run(
    services: dict[str, dict[str, Any]]
) -> None:
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert base and base.group(1) in ("python:3.11-slim-bookworm", "debian:bookworm-slim")
    assert re.search(r"pip install\b.*\s\.(\s|$)", dockerfile), "the package itself"
    for needed in ("pyproject.toml", "protocol", "nbdserve"):
        assert re.search(rf"^COPY .*\b{re.escape(needed)}\b", dockerfile, re.M), needed
    used = " ".join(command_text(s) for s in services.values())
    used += " ".join(services["server"]["healthcheck"]["test"])
    for tool, package in TOOL_PACKAGES.items():
        if re.search(rf"\b{tool}\b", used):
            assert package in dockerfile, (tool, package)
    assert re.search(rf"^EXPOSE {PORT}$", dockerfile, re.M)


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "tests", "bench", "**/__pycache__"} <= ignored
    copied = re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert source not in ignored, f"{source} is copied but excluded from the context"
