"""The floor: the smallest NBD server a Python loop can be, to see what the language allows.

    python3 bench/floor.py IMAGE SOCKET [--spin N]

Serves IMAGE (raw, read-write) on the Unix socket SOCKET for fio, nbdcopy and friends: the
fixed-newstyle handshake with NBD_OPT_GO (structured replies accepted), then READ, WRITE and
DISC only, with no validation, no block layer, no error handling and one thread per
connection blocking in ``recv``. It is not a server anyone should use; it measures the cost
of the work nbdserve cannot avoid (the system calls and the struct packing) so that
nbdserve's own figures can be read against it. bench/README.md ("Speed work") has the
numbers; ``--spin N`` tries N non-blocking receives before blocking, as nbdserve does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import threading

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQIQ")  # structured OFFSET_DATA chunk header with its offset
SIMPLE_MAGIC, CHUNK_MAGIC = 0x67446698, 0x668E33EF


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


def handshake(sock: socket.socket, size: int) -> bool:
    """Negotiate; returns whether structured replies were agreed."""
    sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    recv_exact(sock, 4)
    structured = False
    while True:
        _, option, length = struct.unpack(">QII", recv_exact(sock, 16))
        recv_exact(sock, length)
        if option == OPT_STRUCTURED_REPLY:
            structured = True
            sock.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_ACK, 0))
        elif option == OPT_GO:
            info = struct.pack(">HQH", 0, size, 1 | 4 | 8)  # HAS_FLAGS, SEND_FLUSH, SEND_FUA
            sock.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_INFO, len(info))
                         + info)
            sock.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_ACK, 0))
            return structured
        else:
            sock.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_ERR_UNSUP, 0))


def serve(sock: socket.socket, fd: int, size: int, spin: int) -> None:
    structured = handshake(sock, size)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    have = 0
    while True:
        n = -1
        for _ in range(spin):
            try:
                n = sock.recv_into(view[have:], 0, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                pass
        if n < 0:
            n = sock.recv_into(view[have:])
        if n == 0:
            return
        have += n
        pos = 0
        out: list[bytes | bytearray | memoryview] = []
        while have - pos >= REQUEST.size:
            _, _, cmd, cookie, offset, length = REQUEST.unpack_from(buf, pos)
            if cmd == 0:  # READ
                pos += REQUEST.size
                data = bytearray(length)
                os.preadv(fd, [data], offset)
                if structured:
                    out.append(CHUNK.pack(CHUNK_MAGIC, 1, 1, cookie, length + 8, offset))
                else:
                    out.append(SIMPLE.pack(SIMPLE_MAGIC, 0, cookie))
                out.append(data)
            elif cmd == 1:  # WRITE
                if have - pos < REQUEST.size + length:
                    break
                start = pos + REQUEST.size
                os.pwrite(fd, view[start:start + length], offset)
                pos = start + length
                out.append(SIMPLE.pack(SIMPLE_MAGIC, 0, cookie))
            elif cmd == 2:  # DISC
                return
            else:  # FLUSH and the rest: nothing to do on a page-cached image
                pos += REQUEST.size
                out.append(SIMPLE.pack(SIMPLE_MAGIC, 0, cookie))
        if out:
            sock.sendmsg(out)
        if pos:
            view[:have - pos] = view[pos:have]
            have -= pos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("socket")
    parser.add_argument("--spin", type=int, default=0)
    args = parser.parse_args()
    fd = os.open(args.image, os.O_RDWR)
    size = os.fstat(fd).st_size
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(args.socket)
    listener.listen()

    def connection(sock: socket.socket) -> None:
        with sock, contextlib.suppress(EOFError, OSError):
            serve(sock, fd, size, args.spin)

    while True:
        sock, _ = listener.accept()
        threading.Thread(target=connection, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
