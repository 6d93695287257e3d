"""nbdkit's captive mode: run a command against the running server, exit with its status."""

from __future__ import annotations

import os
import urllib.parse

import trio

from .config import ServerConfig
from .listeners import Listener


def uri_for(listener: Listener, export_name: str) -> str:
    """The NBD URI (doc/uri.md) a client uses to reach ``export_name`` on ``listener``."""
    name = urllib.parse.quote(export_name, safe="")
    if listener.kind == "unix":
        return f"nbd+unix:///{name}?socket={urllib.parse.quote(listener.address, safe='/')}"
    host, _, port = listener.address.rpartition(":")
    if host in ("0.0.0.0", "[::]"):
        host = "localhost"
    return f"nbd://{host}:{port}/{name}"


def captive_environment(listener: Listener, export_name: str) -> dict[str, str]:
    env = dict(os.environ)
    uri = uri_for(listener, export_name)
    env.update(uri=uri, nbd=uri, exportname=export_name,
               unixsocket=listener.address if listener.kind == "unix" else "",
               port=listener.address.rpartition(":")[2] if listener.kind == "tcp" else "")
    return env


async def run_captive(command: str, listener: Listener, config: ServerConfig) -> int:
    """Run ``command`` with ``/bin/sh -c`` and return its exit status; a command killed by a
    signal gives 128 + the signal number, as the shell reports it."""
    export_name = config.exports[0].name if config.exports else ""
    proc = await trio.run_process(["/bin/sh", "-c", command], check=False, stdin=None,
                                  env=captive_environment(listener, export_name))
    code = int(proc.returncode)
    if code < 0:
        return 128 + (-code)
    return code

