"""What the server is asked to run, independent of how it was asked (qemu-nbd flags,
qemu-storage-daemon options or a test): block nodes, exports and listening addresses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

DEFAULT_PORT = 10809
#: qemu-nbd's bound on requests in flight per connection (nbd/server.c).
DEFAULT_MAX_IN_FLIGHT = 16
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: How long SIGTERM waits for requests in flight before cutting connections.
DEFAULT_SHUTDOWN_GRACE = 10.0


@dataclass(frozen=True)
class ExportSpec:
    """One NBD export of a graph node (qemu's BlockExportOptionsNbd)."""

    name: str
    node_name: str
    writable: bool = False
    description: str = ""
    allocation_depth: bool = False
    #: Every write is made durable before it is acknowledged (qemu's writethrough cache).
    writethrough: bool = False
    id: str = ""


@dataclass(frozen=True)
class ListenSpec:
    """Where to accept connections. ``stdin`` serves one connection on stdin/stdout;
    ``systemd`` uses sockets passed by socket activation."""

    unix_path: str | None = None
    #: Permissions of a Unix socket this server creates.
    unix_mode: int = 0o600
    tcp_host: str | None = None
    tcp_port: int | None = None
    stdin: bool = False
    systemd: bool = False


@dataclass
class ServerConfig:
    blockdevs: list[dict[str, Any]]
    exports: list[ExportSpec]
    listen: ListenSpec = field(default_factory=ListenSpec)
    #: Simultaneous clients; 0 = unlimited. Further clients wait in the listen backlog.
    max_connections: int = 0
    #: Keep serving after the last client leaves (qemu-nbd -t).
    persistent: bool = True
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_in_flight_bytes: int = 64 << 20
    pid_file: str | None = None
    #: Captive mode: run this shell command against the server, exit with its status.
    run: str | None = None
    #: Put a temporary qcow2 overlay over each exported node (qemu-nbd -s).
    snapshot: bool = False
    #: Temporary files to remove at exit (snapshot overlays).
    cleanup: list[str] = field(default_factory=list)
    #: STARTTLS: "off", "on" (optional) or "require"; credentials in qemu's x509 layout.
    tls: str = "off"
    tls_creds: str | None = None
    tls_verify_peer: bool = True
    #: Client certificate names allowed (CN or full DN); empty = any verified client.
    tls_authz: list[str] = field(default_factory=list)


def parse_bool(value: Any, *, key: str) -> bool:
    """The block layer's on/off parser, with errors that name the option."""
    from .block.options import parse_bool as block_parse_bool

    try:
        # JSON may give 1/0 where the dotted form gives "1"/"0".
        return block_parse_bool(value if isinstance(value, bool) else str(value))
    except ValueError:
        raise ConfigError(f"invalid value {value!r} for {key}: expected on or off") from None


def parse_dotted(text: str) -> dict[str, Any]:
    """qemu's ``key=value,...`` syntax (``,,`` is a literal comma; dotted keys nest), via the
    block layer's parser so both agree."""
    from .block import parse_dotted as block_parse_dotted

    try:
        return block_parse_dotted(text)
    except ValueError as e:
        raise ConfigError(f"invalid option string {text!r}: {e}") from None


def parse_json_or_dotted(text: str, *, what: str) -> dict[str, Any]:
    """qemu-storage-daemon accepts either form wherever it takes an object."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid JSON for {what}: {e.msg} in {text!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"invalid JSON for {what}: expected an object, got {text!r}")
        return value
    return parse_dotted(text)


def parse_export(text: str) -> ExportSpec:
    """``--export type=nbd,id=..,node-name=..,name=..,writable=on,description=..``."""
    opts = parse_json_or_dotted(text, what="--export")
    known = {"type", "id", "node-name", "name", "writable", "description",
             "allocation-depth", "writethrough"}
    for key in opts:
        if key not in known:
            raise ConfigError(f"--export: unknown option {key!r}")
    if opts.get("type") != "nbd":
        raise ConfigError(f"--export: type must be 'nbd', got {opts.get('type')!r}")
    node = opts.get("node-name")
    if not isinstance(node, str) or not node:
        raise ConfigError(f"--export: node-name is required in {text!r}")
    name = opts.get("name", node)
    if not isinstance(name, str) or len(name.encode()) > 4096:
        raise ConfigError(f"--export: invalid name {name!r}")
    description = str(opts.get("description", ""))
    if len(description.encode()) > 4096:
        raise ConfigError("--export: description longer than 4096 bytes")
    return ExportSpec(
        name=name,
        node_name=node,
        writable=parse_bool(opts.get("writable", False), key="--export writable"),
        description=description,
        allocation_depth=parse_bool(opts.get("allocation-depth", False),
                                    key="--export allocation-depth"),
        writethrough=parse_bool(opts.get("writethrough", False), key="--export writethrough"),
        id=str(opts.get("id", "")),
    )


def parse_nbd_server(text: str) -> tuple[ListenSpec, int]:
    """``--nbd-server addr.type=inet,addr.host=H,addr.port=P`` or ``addr.type=unix,
    addr.path=P``, with ``max-connections=N``. Returns the address and the connection
    limit (0 = unlimited, qemu-storage-daemon's default)."""
    opts = parse_json_or_dotted(text, what="--nbd-server")
    for key in opts:
        if key not in ("addr", "max-connections"):
            raise ConfigError(f"--nbd-server: unknown option {key!r}")
    addr = opts.get("addr")
    if not isinstance(addr, dict):
        raise ConfigError(f"--nbd-server: addr.type is required in {text!r}")
    kind = addr.get("type")
    if kind == "inet":
        for key in addr:
            if key not in ("type", "host", "port"):
                raise ConfigError(f"--nbd-server: unknown option 'addr.{key}'")
        host = addr.get("host")
        listen = ListenSpec(tcp_host=str(host) if host not in (None, "") else None,
                            tcp_port=parse_port(str(addr.get("port", DEFAULT_PORT))))
    elif kind == "unix":
        for key in addr:
            if key not in ("type", "path"):
                raise ConfigError(f"--nbd-server: unknown option 'addr.{key}'")
        path = addr.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError("--nbd-server: addr.path is required for addr.type=unix")
        listen = ListenSpec(unix_path=path)
    else:
        raise ConfigError(f"--nbd-server: addr.type must be inet or unix, got {kind!r}")
    limit = parse_count(str(opts.get("max-connections", 0)), what="max-connections")
    return listen, limit


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"invalid port {text!r}: must be 0..65535")
    return port


def parse_count(text: str, *, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: expected a number") from None
    if value < 0:
        raise ConfigError(f"invalid {what} {text!r}: must not be negative")
    return value
