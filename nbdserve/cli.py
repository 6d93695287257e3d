"""The ``nbdserve`` command line.

Three dialects, so users can bring the command they already know:

* qemu-nbd's flags for one image: ``nbdserve -f qcow2 -x disk -k /run/disk.sock disk.qcow2``;
* qemu-storage-daemon's for graphs: ``--blockdev``, ``--export``, ``--nbd-server``;
* nbdkit's captive mode: ``--run 'qemu-img info "$uri"'``.

Only parsing lives here; :mod:`nbdserve.app` runs what the parse produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import __version__
from .config import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_GRACE,
    ExportSpec,
    ListenSpec,
    ServerConfig,
    parse_count,
    parse_export,
    parse_json_or_dotted,
    parse_nbd_server,
    parse_port,
)
from .errors import ConfigError
from .image import CACHE_MODES, image_options
from .sizes import parse_size

PROG = "nbdserve"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the message names the bad argument.
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _typed(convert: type[int] | type[float], what: str) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must not be negative")
        return value
    return parse


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid socket mode {text!r}: expected octal, "
                                         "like 600 or 660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid socket mode {text!r}: must be 0..777")
    return mode


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve disk images and block graphs over NBD.",
                epilog="FILE may be a pseudo-file: memory:SIZE (a sparse RAM disk) or "
                       "null:SIZE (reads zeros, drops writes).")
    p.add_argument("file", nargs="?", metavar="FILE", help="image to export (qemu-nbd style)")

    img = p.add_argument_group("image (qemu-nbd compatible)")
    img.add_argument("-f", "--format", choices=("raw", "qcow2"),
                     help="image format; probed if absent (qcow2 by its magic, else raw)")
    img.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    img.add_argument("-x", "--export-name", default="", metavar="NAME",
                     help='export name (default "")')
    img.add_argument("-D", "--description", default="", metavar="TEXT",
                     help="export description")
    img.add_argument("-s", "--snapshot", action="store_true",
                     help="write to a temporary qcow2 overlay; the image is never modified")
    img.add_argument("-A", "--allocation-depth", action="store_true",
                     help="offer the qemu:allocation-depth meta context")
    img.add_argument("--image-opts", action="store_true",
                     help="FILE is a dotted option string (driver=raw,file.filename=x.img)")
    img.add_argument("--discard", choices=("ignore", "unmap"),
                     help="whether TRIM and MAY_UNMAP free space (default ignore)")
    img.add_argument("--detect-zeroes", choices=("off", "on", "unmap"),
                     help="turn writes of zeros into zero-writes (default off)")
    img.add_argument("--cache", choices=CACHE_MODES, help="cache mode (default writeback)")
    img.add_argument("-n", "--nocache", dest="cache", action="store_const", const="none",
                     help="same as --cache=none")
    img.add_argument("--aio", choices=("threads", "native", "io_uring"),
                     help="file I/O mode (default threads)")

    net = p.add_argument_group("server")
    net.add_argument("-k", "--socket", metavar="PATH", help="listen on this Unix socket")
    net.add_argument("--socket-mode", type=_octal_mode, default=0o600, metavar="MODE",
                     help="permissions of the Unix socket, in octal (default 600: only the "
                          "owner may connect)")
    net.add_argument("-p", "--port", type=_typed(int, "port"), metavar="PORT",
                     help=f"TCP port (default {DEFAULT_PORT})")
    net.add_argument("-b", "--bind", metavar="ADDR",
                     help="TCP address to listen on (default: all, IPv4 and IPv6)")
    net.add_argument("-t", "--persistent", action="store_true",
                     help="keep serving after the last client disconnects")
    net.add_argument("-e", "--shared", type=_typed(int, "connection count"), metavar="N",
                     help="simultaneous clients (default 1; 0 = unlimited)")
    net.add_argument("--stdin", "--single", dest="stdin", action="store_true",
                     help="serve one client on stdin/stdout (inetd style)")
    net.add_argument("--pid-file", metavar="PATH", help="write the pid here once listening")
    net.add_argument("--handshake-timeout", type=_typed(float, "timeout"),
                     default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS",
                     help=f"drop clients that do not finish the handshake in time "
                          f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})")
    net.add_argument("--shutdown-grace", type=_typed(float, "grace period"),
                     default=DEFAULT_SHUTDOWN_GRACE, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, how long requests in flight may take before "
                          f"connections are cut (default {DEFAULT_SHUTDOWN_GRACE:g})")
    net.add_argument("--max-in-flight", type=_typed(int, "request count"),
                     default=DEFAULT_MAX_IN_FLIGHT, metavar="N",
                     help="requests processed at once per connection "
                          f"(default {DEFAULT_MAX_IN_FLIGHT})")

    net.add_argument("--max-in-flight-bytes", default="64M", metavar="SIZE",
                     help="READ/WRITE payload bytes processed at once, all clients together "
                          "(default 64M)")

    qsd = p.add_argument_group("graphs (qemu-storage-daemon compatible)")
    qsd.add_argument("--blockdev", action="append", default=[], metavar="OPTIONS",
                     help="add a block node (JSON or dotted key=value,...); repeatable")
    qsd.add_argument("--export", action="append", default=[], metavar="OPTIONS",
                     help="type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on]"
                          "[,description=TEXT][,allocation-depth=on]; repeatable")
    qsd.add_argument("--nbd-server", metavar="OPTIONS",
                     help="addr.type=inet,addr.host=H,addr.port=P | addr.type=unix,addr.path=P"
                          "[,max-connections=N]")

    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls", choices=("off", "on", "require"),
                     help="STARTTLS policy (default: require with --tls-creds, else off)")
    tls.add_argument("--tls-creds", metavar="DIR",
                     help="x509 credentials as qemu lays them out: ca-cert.pem, "
                          "server-cert.pem, server-key.pem")
    tls.add_argument("--tls-verify-peer", choices=("on", "off"), default="on",
                     help="require and verify client certificates (default on)")
    tls.add_argument("--tls-authz", action="append", default=[], metavar="NAME",
                     help="allow only this client certificate (CN or full DN); repeatable")

    run = p.add_argument_group("captive mode (nbdkit compatible)")
    run.add_argument("--run", metavar="CMD",
                     help="serve on a private socket, run CMD with $uri $nbd $unixsocket "
                          "$port $exportname set, exit with its status")

    log = p.add_argument_group("logging")
    log.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    log.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                     help="auto: console on a terminal, JSON otherwise")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return p


def config_from_args(ns: argparse.Namespace) -> tuple[ServerConfig, list[str]]:
    """The server configuration for parsed arguments, and warnings to log."""
    warnings: list[str] = []
    graph_mode = bool(ns.blockdev or ns.export)
    if graph_mode and ns.file is not None:
        raise ConfigError(f"FILE {ns.file!r} cannot be combined with --blockdev/--export")
    if not graph_mode and ns.file is None:
        raise ConfigError("nothing to export: give FILE, or --blockdev and --export")
    if ns.nbd_server is not None and (ns.socket or ns.port is not None or ns.bind):
        raise ConfigError("--nbd-server cannot be combined with -k/--socket, -p or -b")
    if ns.stdin and (ns.socket or ns.port is not None or ns.bind or ns.nbd_server or ns.run):
        raise ConfigError("--stdin serves stdin/stdout; it takes no listening address or --run")
    if ns.socket is not None and ns.port is not None:
        raise ConfigError("-k/--socket and -p/--port cannot be used together")

    if graph_mode:
        for flag, name in ((ns.format, "-f"), (ns.read_only, "-r"), (ns.export_name, "-x"),
                           (ns.description, "-D"), (ns.image_opts, "--image-opts"),
                           (ns.allocation_depth, "-A")):
            if flag:
                raise ConfigError(f"{name} applies to FILE; with --export set it there")
        blockdevs = [parse_json_or_dotted(text, what="--blockdev") for text in ns.blockdev]
        exports = [parse_export(text) for text in ns.export]
        if not exports:
            raise ConfigError("--blockdev given without any --export")
        names = [e.name for e in exports]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"--export: duplicate export name {name!r}")
        # qemu-storage-daemon runs until told to stop, and serves any number of clients.
        persistent = True
        max_connections = 0
    else:
        # With -s the image itself is only read: writes go to a temporary overlay.
        image = image_options(ns.file, fmt=ns.format, image_opts=ns.image_opts,
                              read_only=ns.read_only or ns.snapshot, discard=ns.discard,
                              detect_zeroes=ns.detect_zeroes, cache=ns.cache, aio=ns.aio)
        if image.warning:
            warnings.append(image.warning)
        blockdevs = [image.options]
        if len(ns.export_name.encode()) > 4096 or len(ns.description.encode()) > 4096:
            raise ConfigError("export names and descriptions are limited to 4096 bytes")
        exports = [ExportSpec(name=ns.export_name, node_name=image.options["node-name"],
                              writable=not ns.read_only, description=ns.description,
                              allocation_depth=ns.allocation_depth,
                              writethrough=image.writethrough)]
        # Captive commands often connect several times (and nbdcopy in parallel).
        persistent = ns.persistent or ns.run is not None
        max_connections = 1 if ns.run is None else 0

    if ns.shared is not None:
        max_connections = ns.shared
    if ns.nbd_server is not None:
        listen, limit = parse_nbd_server(ns.nbd_server)
        listen = dataclasses.replace(listen, unix_mode=ns.socket_mode)
        if ns.shared is None:
            max_connections = limit
    elif ns.stdin:
        listen = ListenSpec(stdin=True)
    elif ns.socket is not None:
        listen = ListenSpec(unix_path=ns.socket, unix_mode=ns.socket_mode)
    elif ns.run is not None and ns.port is None and ns.bind is None:
        listen = ListenSpec()  # a private socket, chosen by the captive runner
    else:
        listen = ListenSpec(tcp_host=ns.bind, tcp_port=DEFAULT_PORT if ns.port is None
                            else parse_port(str(ns.port)))
    tls_mode = ns.tls or ("require" if ns.tls_creds else "off")
    if tls_mode != "off" and not ns.tls_creds:
        raise ConfigError(f"--tls={tls_mode} needs --tls-creds DIR")
    if ns.tls_authz and tls_mode == "off":
        raise ConfigError("--tls-authz needs TLS (--tls-creds)")
    if ns.max_in_flight < 1:
        raise ConfigError(f"invalid --max-in-flight {ns.max_in_flight}: must be at least 1")
    parse_count(str(max_connections), what="connection count")
    return ServerConfig(
        blockdevs=blockdevs,
        exports=exports,
        listen=listen,
        max_connections=max_connections,
        persistent=persistent,
        handshake_timeout=ns.handshake_timeout,
        shutdown_grace=ns.shutdown_grace,
        max_in_flight=ns.max_in_flight,
        max_in_flight_bytes=parse_size(ns.max_in_flight_bytes, what="--max-in-flight-bytes"),
        pid_file=ns.pid_file,
        run=ns.run,
        snapshot=ns.snapshot,
        tls=tls_mode,
        tls_creds=ns.tls_creds if tls_mode != "off" else None,
        tls_verify_peer=ns.tls_verify_peer == "on",
        tls_authz=list(ns.tls_authz),
    ), warnings


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["create"]:  # a file named "create" can still be served as ./create
        from . import create

        return create.main(args[1:])
    ns = build_parser().parse_args(args)
    from . import log

    log.configure(verbose=ns.verbose, fmt=ns.log_format)
    try:
        config, warnings = config_from_args(ns)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    from . import app  # the server's imports are not needed to report a bad argument
    from .datapath import GIL_SWITCH_INTERVAL

    app.catch_early_signals()
    # The process is ours: let connection threads take turns at the GIL sooner (see
    # datapath.GIL_SWITCH_INTERVAL). A program embedding the server decides for itself.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    return app.main(config, warnings=warnings)
