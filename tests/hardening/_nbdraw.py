"""A deliberately independent raw-bytes NBD client for adversarial tests.

It speaks the wire format with ``struct`` only (not the ``protocol`` package), so it can send
what a well-behaved client never would, and so a bug in ``protocol`` cannot hide itself by
being on both ends. Works on a plain socket or an ``ssl.SSLSocket`` after STARTTLS.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_TOO_BIG = 0x80000009

INFO_EXPORT = 0

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_DF = 1 << 7

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1

CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_ERROR = 32769
CHUNK_ERROR_OFFSET = 32770
REPLY_FLAG_DONE = 1

# Replies we accept from a server under test are bounded, so a broken server cannot make the
# test allocate without limit.
MAX_REPLY = 64 << 20

Sock = socket.socket | ssl.SSLSocket


class Closed(EOFError):
    """The server closed the connection."""


def recv_exact(sock: Sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise Closed(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_closed(sock: Sock, timeout: float = 10.0) -> bytes:
    """Read until the server closes; returns what it sent. Fails if it stays open."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while chunk := sock.recv(65536):
            got += chunk
            if len(got) > MAX_REPLY:
                raise AssertionError("server kept sending")
    except (ConnectionResetError, ssl.SSLError):
        pass
    except TimeoutError:
        raise AssertionError(f"server kept the connection open for {timeout}s") from None
    return bytes(got)


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def greeting(sock: Sock) -> int:
    """Read the newstyle greeting; returns the handshake flags."""
    magic, opt, flags = struct.unpack(">QQH", recv_exact(sock, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT), "not a fixed-newstyle greeting"
    return int(flags)


def client_flags(flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data


def go_data(name: bytes, infos: tuple[int, ...] = (), name_len: int | None = None) -> bytes:
    n = len(name) if name_len is None else name_len
    return (
        struct.pack(">I", n) + name + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )  # fmt: skip


@dataclass(frozen=True)
class OptReply:
    opt: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & 0x80000000)


def read_reply(sock: Sock) -> OptReply:
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == REP_MAGIC, f"bad option reply magic {magic:#x}"
    assert length <= MAX_REPLY
    return OptReply(opt, rtype, recv_exact(sock, length))


def read_final_reply(sock: Sock) -> tuple[list[OptReply], OptReply]:
    """Read replies up to the final one (ACK or an error); returns (informational, final)."""
    infos: list[OptReply] = []
    while True:
        r = read_reply(sock)
        if r.type == REP_ACK or r.is_error:
            return infos, r
        infos.append(r)


def handshake(sock: Sock, name: bytes = b"", *, structured: bool = False) -> tuple[int, int]:
    """Greeting, flags, [STRUCTURED_REPLY], GO; returns (export size, transmission flags)."""
    greeting(sock)
    sock.sendall(client_flags())
    return negotiate(sock, name, structured=structured)


def negotiate(sock: Sock, name: bytes = b"", *, structured: bool = False) -> tuple[int, int]:
    """Options after the greeting: [STRUCTURED_REPLY], then GO."""
    if structured:
        sock.sendall(option(OPT_STRUCTURED_REPLY))
        _, r = read_final_reply(sock)
        assert r.type == REP_ACK, f"STRUCTURED_REPLY refused: {r.type:#x}"
    sock.sendall(option(OPT_GO, go_data(name)))
    infos, final = read_final_reply(sock)
    assert final.type == REP_ACK, f"GO refused: {final.type:#x} {final.data!r}"
    for r in infos:
        if r.type == REP_INFO and struct.unpack(">H", r.data[:2])[0] == INFO_EXPORT:
            size, tflags = struct.unpack(">QH", r.data[2:12])
            return int(size), int(tflags)
    raise AssertionError("GO succeeded without NBD_INFO_EXPORT")


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass(frozen=True)
class Reply:
    cookie: int
    error: int  # 0 on success
    data: bytes  # READ payload (holes filled with zeros); empty otherwise
    structured: bool
    message: bytes = b""  # the error chunk's message, for structured errors


def read_reply_of(sock: Sock, read_off: int = 0, read_len: int = 0) -> Reply:
    """Read one whole reply; ``read_off``/``read_len`` give the READ it answers (len 0: none)."""
    magic = struct.unpack(">I", recv_exact(sock, 4))[0]
    if magic == SIMPLE_REPLY_MAGIC:
        error, cookie = struct.unpack(">IQ", recv_exact(sock, 12))
        data = recv_exact(sock, read_len) if read_len and not error else b""
        return Reply(cookie, error, data, structured=False)
    assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
    buf = bytearray(read_len)
    error, message, first = 0, b"", True
    while True:
        if not first:
            magic = struct.unpack(">I", recv_exact(sock, 4))[0]
            assert magic == STRUCTURED_REPLY_MAGIC, f"bad chunk magic {magic:#x}"
        first = False
        flags, ctype, cookie, length = struct.unpack(">HHQI", recv_exact(sock, 16))
        assert length <= MAX_REPLY
        payload = recv_exact(sock, length)
        if ctype == CHUNK_OFFSET_DATA:
            off = struct.unpack(">Q", payload[:8])[0] - read_off
            assert off >= 0 and off + length - 8 <= read_len, "data chunk outside the request"
            buf[off : off + length - 8] = payload[8:]
        elif ctype == CHUNK_OFFSET_HOLE:
            pass  # buf is zero-filled already
        elif ctype in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
            error, mlen = struct.unpack(">IH", payload[:6])
            message = payload[6 : 6 + mlen]
        if flags & REPLY_FLAG_DONE:
            return Reply(cookie, error, bytes(buf) if not error else b"", True, message)


def tls_wrap(sock: socket.socket, creds_dir: Path) -> ssl.SSLSocket:
    """Upgrade after a STARTTLS ACK, as a client with ``creds_dir``'s certificate (if any)."""
    ctx = ssl.create_default_context(cafile=str(creds_dir / "ca-cert.pem"))
    if (creds_dir / "client-cert.pem").exists():
        ctx.load_cert_chain(creds_dir / "client-cert.pem", creds_dir / "client-key.pem")
    return ctx.wrap_socket(sock, server_hostname="localhost")


def assert_serves(path: Path, name: bytes = b"", offset: int = 1 << 20) -> None:
    """A well-behaved client can still connect, write, read back and flush."""
    payload = bytes(range(256)) * 16
    with connect(path) as s:
        handshake(s, name)
        s.sendall(request(CMD_WRITE, 1, offset, len(payload)) + payload)
        assert read_reply_of(s).error == 0
        s.sendall(request(CMD_READ, 2, offset, len(payload)))
        r = read_reply_of(s, offset, len(payload))
        assert (r.cookie, r.error, r.data) == (2, 0, payload)
        s.sendall(request(CMD_FLUSH, 3, 0, 0))
        assert read_reply_of(s).error == 0
        s.sendall(request(CMD_DISC, 4, 0, 0))
        wait_closed(s)
