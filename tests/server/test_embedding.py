"""The embedding API from nbdserve's package: a ServerConfig served from inside trio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import nbdserve


async def test_serve_config_from_python(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    config = nbdserve.ServerConfig(
        blockdevs=[{"driver": "memory", "node-name": "m0", "size": 8 << 20}],
        exports=[nbdserve.ExportSpec(name="scratch", node_name="m0", writable=True,
                                     description="embedded")],
        listen=nbdserve.ListenSpec(unix_path=str(sock)),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nbdserve.serve_config, config)
        with trio.fail_after(10):
            while not sock.exists():
                await trio.sleep(0.02)
        uri = f"nbd+unix:///scratch?socket={sock}"
        await trio.run_process(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 4096", uri],
                               capture_stdout=True)
        result = await trio.run_process(["nbdinfo", "--json", uri], capture_stdout=True)
        export = json.loads(result.stdout)["exports"][0]
        assert export["export-size"] == 8 << 20
        assert export["description"] == "embedded"
        check = await trio.run_process(
            ["qemu-io", "-f", "raw", "-c", "read -P 0x5a 4096 4096", uri],
            capture_stdout=True)
        assert b"read 4096/4096" in check.stdout
        nursery.cancel_scope.cancel()


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        nbdserve.no_such_thing  # noqa: B018
