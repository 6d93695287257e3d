"""Command-line parsing: the three dialects map to the right configuration, bad input gives
one line and the right exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nbdserve.cli import build_parser, config_from_args
from nbdserve.config import ListenSpec
from nbdserve.errors import ConfigError


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return config_from_args(build_parser().parse_args(list(argv)))


@pytest.fixture
def raw_image(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 65536)
    return str(path)


def test_qemu_nbd_defaults(raw_image: str) -> None:
    config, warnings = parse("-f", "raw", raw_image)
    # A raw image without a window is served by its file node alone: no pass-through layer.
    assert config.blockdevs == [{"driver": "file", "filename": raw_image, "node-name": "disk0"}]
    (export,) = config.exports
    assert (export.name, export.node_name, export.writable) == ("", "disk0", True)
    # qemu-nbd: one client, exit after it leaves, TCP 10809 on all addresses.
    assert config.max_connections == 1 and not config.persistent
    assert config.listen == ListenSpec(tcp_host=None, tcp_port=10809)
    assert warnings == []


def test_probing_warns_for_writable_raw_only(raw_image: str, tmp_path: Path) -> None:
    config, warnings = parse(raw_image)
    assert config.blockdevs[0]["driver"] == "file"
    assert len(warnings) == 1 and "probing guessed raw" in warnings[0]
    assert parse("-r", raw_image)[1] == []
    qcow2 = tmp_path / "x.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + b"\0" * 508)
    config, warnings = parse(str(qcow2))
    assert config.blockdevs[0]["driver"] == "qcow2" and warnings == []


def test_flags_map_to_node_and_export_options(raw_image: str) -> None:
    config, _ = parse("-f", "raw", "-r", "-x", "disk", "-D", "a disk", "-k", "/tmp/x.sock",
                      "-t", "-e", "4", "--discard", "unmap", "--detect-zeroes", "unmap",
                      "--cache", "directsync", "--aio", "native", "-A", raw_image)
    top = config.blockdevs[0]
    assert top["read-only"] is True and top["discard"] == "unmap"
    assert top["detect-zeroes"] == "unmap" and top["cache.direct"] is True
    assert top["driver"] == "file" and top["aio"] == "native"
    (export,) = config.exports
    assert (export.name, export.description, export.writable) == ("disk", "a disk", False)
    assert export.writethrough and export.allocation_depth
    assert config.listen == ListenSpec(unix_path="/tmp/x.sock")
    assert config.persistent and config.max_connections == 4


def test_format_node_options_go_to_its_file_child(tmp_path: Path) -> None:
    qcow2 = tmp_path / "x.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + b"\0" * 508)
    config, _ = parse("-r", "--aio", "native", "--cache", "none", str(qcow2))
    top = config.blockdevs[0]
    assert top["driver"] == "qcow2" and top["read-only"] is True
    assert top["file"] == {"driver": "file", "filename": str(qcow2), "cache.direct": True,
                           "aio": "native", "read-only": True}


def test_cache_unsafe_ignores_flushes(raw_image: str) -> None:
    config, _ = parse("-f", "raw", "--cache", "unsafe", raw_image)
    assert config.blockdevs[0]["cache.no-flush"] is True
    assert not config.exports[0].writethrough


def test_pseudo_files() -> None:
    config, _ = parse("memory:64M")
    assert config.blockdevs == [{"driver": "memory", "size": 64 << 20, "node-name": "disk0"}]
    config, _ = parse("null:1G")
    assert config.blockdevs[0]["driver"] == "null"
    assert config.blockdevs[0]["size"] == 1 << 30


def test_run_uses_a_private_socket_and_many_clients() -> None:
    config, _ = parse("--run", "true", "memory:1M")
    assert config.run == "true" and config.listen == ListenSpec()
    assert config.persistent and config.max_connections == 0


def test_storage_daemon_syntax() -> None:
    config, _ = parse(
        "--blockdev", '{"driver": "memory", "node-name": "m0", "size": 1048576}',
        "--blockdev", '{"driver": "null", "node-name": "n0", "size": 4096}',
        "--export", "type=nbd,id=e0,node-name=m0,name=mem,writable=on,description=RAM",
        "--export", '{"type": "nbd", "id": "e1", "node-name": "n0", "allocation-depth": true}',
        "--nbd-server", '{"addr": {"type": "unix", "path": "/tmp/q.sock"}, '
                        '"max-connections": 3}')
    assert [b["node-name"] for b in config.blockdevs] == ["m0", "n0"]
    mem, null = config.exports
    assert (mem.name, mem.node_name, mem.writable, mem.description) == ("mem", "m0", True, "RAM")
    assert (null.name, null.writable, null.allocation_depth) == ("n0", False, True)
    assert config.listen == ListenSpec(unix_path="/tmp/q.sock")
    assert config.max_connections == 3 and config.persistent


@pytest.mark.parametrize(("argv", "message"), [
    ((), "nothing to export"),
    (("-f", "raw", "/nonexistent/disk.img"), "/nonexistent/disk.img"),
    (("-k", "/tmp/s", "-p", "1", "memory:1M"), "cannot be used together"),
    (("--detect-zeroes", "unmap", "memory:1M"), "requires --discard=unmap"),
    (("memory:12Q",), "12Q"),
    (("-f", "qcow2", "null:1M"), "pseudo-file"),
    (("--blockdev", "{bad json", "--export", "type=nbd,node-name=x"), "{bad json"),
    (("--blockdev", '{"driver": "null", "size": 1}'), "without any --export"),
    (("--blockdev", '{"driver": "null", "node-name": "n", "size": 1}',
      "--export", '{"type": "vhost", "node-name": "n"}'), "type must be 'nbd'"),
    (("--blockdev", '{"driver": "null", "node-name": "n", "size": 1}',
      "--export", '{"type": "nbd", "node-name": "n", "writable": "maybe"}'), "'maybe'"),
    (("--blockdev", '{"driver": "null", "node-name": "n", "size": 1}',
      "--export", '{"type": "nbd", "node-name": "n"}',
      "--nbd-server", '{"addr": {"type": "vsock"}}'), "'vsock'"),
    (("--blockdev", '{"driver": "null", "node-name": "n", "size": 1}',
      "--export", '{"type": "nbd", "node-name": "n"}', "memory:1M"), "cannot be combined"),
])
def test_bad_arguments_name_the_bad_value(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse(*argv)
    assert message in str(info.value)


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdserve", *argv], capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(("argv", "status", "needle"), [
    (("-p", "abc", "memory:1M"), 2, "'abc'"),
    (("--cache", "fast", "memory:1M"), 2, "'fast'"),
    (("-f", "raw", "/nonexistent.img"), 1, "/nonexistent.img"),
    (("memory:lots",), 1, "'lots'"),
    (("--blockdev", '{"driver": "nosuch", "node-name": "n"}',
      "--export", "type=nbd,node-name=n"), 1, "nosuch"),
])
def test_cli_errors_are_one_line(argv: tuple[str, ...], status: int, needle: str) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == status
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
