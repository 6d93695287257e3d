"""Injected I/O errors (blkdebug) reach clients as the right NBD errors and hurt nobody else.

One server, one export per errno: a blkdebug filter over a memory disk fails read, write,
zero and discard requests that touch [1 MiB, 1 MiB + 64 KiB), and every flush. A fourth
export has no faults.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import _libnbd as libnbd
from . import _nbdraw as nbd
from ._server import Server, Servers, target

pytestmark = pytest.mark.usefixtures("nbdserve_only")

BAD = 1 << 20
BAD_LEN = 64 << 10
ERRNOS = {"eio": errno.EIO, "enospc": errno.ENOSPC, "eperm": errno.EPERM}
OPS = ["read", "write", "zero", "discard"]


def _args(sock: Path) -> list[str]:
    args: list[str] = []
    for name, code in ERRNOS.items():
        rules = [
            {"errno": errno.errorcode[code], "iotype": OPS, "offset": BAD, "length": BAD_LEN},
            {"errno": code, "iotype": "flush"},
        ]
        args += ["--blockdev", json.dumps({"driver": "memory", "node-name": f"m-{name}",
                                           "size": "16M", "discard": "unmap"})]  # fmt: skip
        args += ["--blockdev", json.dumps({"driver": "blkdebug", "node-name": name,
                                           "image": f"m-{name}", "discard": "unmap",
                                           "inject-error": rules})]  # fmt: skip
        args += ["--export", f"type=nbd,id=e-{name},node-name={name},name={name},writable=on"]
    args += ["--blockdev", "driver=memory,node-name=healthy,size=16M"]
    args += ["--export", "type=nbd,id=e-healthy,node-name=healthy,name=healthy,writable=on"]
    args += ["--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=16"]
    return args


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if target() != "nbdserve":  # module fixtures run before the nbdserve_only check
        pytest.skip(f"nbdserve-only feature; this run targets {target()}")
    sockdir = Path(tempfile.mkdtemp(prefix="nbdh-"))
    servers = Servers(tmp_path_factory.mktemp("faults"), sockdir)
    sock = sockdir / "faults.sock"
    yield servers.daemon(*_args(sock), sock=sock)
    servers.finish()
    shutil.rmtree(sockdir, ignore_errors=True)


# Per export: every op in the bad range must fail with the injected errno, the handle must
# keep working outside it, two flushes in a row must both fail (a failed flush never makes the
# next one look unnecessary), and a second client on the healthy export is unaffected.
FAULT_SCRIPT = """
def expect_error(fn):
    try:
        fn()
    except nbd.Error as e:
        return e.errnum
    return 0

results = {}
bad, n = ARGS["bad"], ARGS["len"]
other = nbd.NBD()
other.set_export_name("healthy")
other.connect_unix(ARGS["sock"])
for name in ARGS["exports"]:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(ARGS["sock"])
    assert h.can_trim() and h.can_zero() and h.can_flush(), name
    r = {
        "read": expect_error(lambda: h.pread(4096, bad)),
        "write": expect_error(lambda: h.pwrite(b"x" * 4096, bad + 4096)),
        "zero": expect_error(lambda: h.zero(8192, bad + n - 4096)),
        "discard": expect_error(lambda: h.trim(65536, bad)),
    }
    # Still usable outside the bad range, and the healthy export is untouched.
    h.pwrite(b"ok" * 2048, 0)
    assert h.pread(4096, 0) == b"ok" * 2048
    other.pwrite(name.encode() * 8, 0)
    assert other.pread(len(name) * 8, 0) == name.encode() * 8
    r["flush"] = expect_error(h.flush)
    r["flush-again"] = expect_error(h.flush)
    assert h.pread(4096, 0) == b"ok" * 2048
    results[name] = r
    h.shutdown()
other.flush()
print(json.dumps(results))
"""


def test_injected_errors_map_to_nbd_errors(faulty: Server) -> None:
    out = libnbd.check(
        FAULT_SCRIPT, sock=str(faulty.sock), exports=list(ERRNOS), bad=BAD, len=BAD_LEN
    )
    results = json.loads(out)
    want = {
        name: dict.fromkeys([*OPS, "flush", "flush-again"], code) for name, code in ERRNOS.items()
    }
    assert results == want
    assert faulty.alive()
    nbd.assert_serves(faulty.sock, b"healthy")


@pytest.mark.parametrize("name", list(ERRNOS))
def test_structured_error_chunk_carries_errno_and_message(faulty: Server, name: str) -> None:
    with nbd.connect(faulty.sock) as s:
        nbd.handshake(s, name.encode(), structured=True)
        s.sendall(nbd.request(nbd.CMD_READ, 11, BAD - 4096, 8192))
        r = nbd.read_reply_of(s, BAD - 4096, 8192)
        assert (r.cookie, r.structured, r.error) == (11, True, ERRNOS[name])
        assert r.message, "error chunk without a message"
        # Flushing is skipped when nothing was written since the last flush (as in QEMU), so
        # write first to give the flush something to do.
        s.sendall(nbd.request(nbd.CMD_WRITE, 14, 0, 4) + b"data")
        assert nbd.read_reply_of(s).error == 0
        s.sendall(nbd.request(nbd.CMD_FLUSH, 12, 0, 0))
        r = nbd.read_reply_of(s)
        assert (r.cookie, r.error) == (12, ERRNOS[name])
        s.sendall(nbd.request(nbd.CMD_READ, 13, 0, 4096))
        assert nbd.read_reply_of(s, 0, 4096).error == 0
