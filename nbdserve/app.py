"""Run a :class:`~nbdserve.config.ServerConfig`: open the graph, attach the exports, listen,
serve until told to stop, then flush and close everything."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from protocol import TLSMode

from .block import Graph, GraphError, open_graph
from .captive import run_captive
from .config import ServerConfig
from .errors import ConfigError
from .exports import Catalogue, attach_exports
from .listeners import Listener, open_tcp, open_unix, systemd_listeners
from .log import get_logger
from .server import Server
from .transport import stdio_transport


def main(config: ServerConfig, *, warnings: Sequence[str] = ()) -> int:
    """Run the server to completion; the process exit status."""
    try:
        return int(trio.run(serve_config, config, warnings))
    except (ConfigError, GraphError) as e:
        print(f"nbdserve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        return 130


def open_listeners(config: ServerConfig, private_dir: str | None) -> list[Listener]:
    activated = systemd_listeners()
    if activated:
        return activated
    listen = config.listen
    if listen.unix_path is not None:
        return [open_unix(listen.unix_path, listen.unix_mode)]
    if listen.tcp_port is not None:
        return open_tcp(listen.tcp_host, listen.tcp_port)
    assert private_dir is not None, "captive mode without an address uses a private socket"
    return [open_unix(os.path.join(private_dir, "nbd.sock"))]


def _warn_if_exposed(listeners: Sequence[Listener], config: ServerConfig) -> None:
    """Anyone who can reach a non-loopback address can write a writable export in
    plaintext: say so at start."""
    if config.tls != "off" or not any(e.writable for e in config.exports):
        return
    for listener in listeners:
        if listener.kind != "tcp":
            continue
        host = listener.address.rpartition(":")[0].strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            get_logger().warning("writable export on a non-loopback address without TLS: "
                                 "any client that can reach it can change the data",
                                 address=listener.address)


def write_pid_file(path: str) -> None:
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(temp, path)
    except OSError as e:
        raise ConfigError(f"cannot write pid file {path!r}: {e.strerror}") from None


#: A stop signal that arrived before the server listened for signals (see catch_early_signals).
_early_signal: int | None = None


def catch_early_signals() -> None:
    """Until the server listens for SIGTERM/SIGINT itself, remember them instead of dying with
    status 143: the server then stops as soon as it is up, cleanly, with status 0."""

    def remember(signum: int, frame: object) -> None:
        global _early_signal
        _early_signal = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, remember)


async def _watch_signals(server: Server, captive: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        if _early_signal is not None:
            get_logger().info("signal received", signal=signal.Signals(_early_signal).name)
            captive.cancel()
            server.shutdown()
        async for signum in signals:
            get_logger().info("signal received", signal=signal.Signals(signum).name)
            captive.cancel()
            server.shutdown()


async def serve_config(config: ServerConfig, warnings: Sequence[str] = ()) -> int:
    log = get_logger()
    for warning in warnings:
        log.warning(warning)
    graph = await open_graph(config.blockdevs)
    private_dir: str | None = None
    pid_written = False
    try:
        if config.snapshot:
            await _add_snapshot_overlays(graph, config)
        exports = attach_exports(graph, config.exports,
                                 multi_conn_allowed=config.max_connections != 1)
        server = Server(Catalogue(exports), max_connections=config.max_connections,
                        persistent=config.persistent,
                        handshake_timeout=config.handshake_timeout,
                        shutdown_grace=config.shutdown_grace,
                        max_in_flight=config.max_in_flight,
                        max_in_flight_bytes=config.max_in_flight_bytes, **_tls_options(config))
        if config.listen.stdin:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, server, trio.CancelScope())
                await server.serve_transport(stdio_transport())
                nursery.cancel_scope.cancel()
            return 0
        if config.run is not None and config.listen == type(config.listen)():
            private_dir = tempfile.mkdtemp(prefix="nbdserve-")
        listeners = open_listeners(config, private_dir)
        _warn_if_exposed(listeners, config)
        status = 0
        captive = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, server, captive)
            await nursery.start(server.serve, listeners)
            if config.pid_file is not None:
                write_pid_file(config.pid_file)
                pid_written = True
            if config.run is not None:
                with captive:
                    status = await run_captive(config.run, listeners[0], config)
                server.shutdown()
            await server.closed.wait()
            nursery.cancel_scope.cancel()
        return status
    finally:
        with trio.CancelScope(shield=True):
            await graph.close()
        if pid_written and config.pid_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
        for path in config.cleanup:
            with contextlib.suppress(OSError):
                os.unlink(path)
        log.info("stopped")


def _tls_options(config: ServerConfig) -> dict[str, Any]:
    if config.tls == "off" or config.tls_creds is None:
        return {}
    from . import tls

    try:
        context = tls.server_context(Path(config.tls_creds),
                                     verify_peer=config.tls_verify_peer)
    except tls.TLSCredsError as e:
        raise ConfigError(str(e)) from None
    allowed = list(config.tls_authz)
    authz = (lambda stream: tls.check_authz(stream, allowed)) if allowed else None
    return {"tls": TLSMode(config.tls), "ssl_context": context, "tls_authz": authz}


async def _add_snapshot_overlays(graph: Graph, config: ServerConfig) -> None:
    """qemu-nbd -s: export a temporary qcow2 overlay instead of each node, so the image is
    only ever read (the overlay file is already unlinked: nothing is left behind)."""
    from .block.qcow2 import add_snapshot_overlay

    overlays: dict[str, str] = {}
    for spec in config.exports:
        if spec.node_name not in overlays:
            node = await add_snapshot_overlay(graph, spec.node_name)
            overlays[spec.node_name] = node.name
    config.exports = [dataclasses.replace(spec, node_name=overlays[spec.node_name])
                      for spec in config.exports]
