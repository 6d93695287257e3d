"""STARTTLS end to end: nbdserve's ``--tls*`` flags driven by libnbd, qemu and a raw client.

Flags under test (nbdkit's meanings, qemu's credentials layout):
``--tls-creds DIR`` (alone: TLS required), ``--tls off|on|require``,
``--tls-verify-peer on|off`` (default on, as qemu), ``--tls-authz NAME`` (repeatable; a
certificate's CN or its full DN as qemu prints it).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import _libnbd as libnbd
from . import _nbdraw as nbd
from ._certs import CLIENT_CN, CLIENT_O, Creds
from ._server import NBDSERVE, MiB, Server, Servers, env

pytestmark = pytest.mark.usefixtures("nbdserve_only")

REP_MAGIC_BYTES = nbd.REP_MAGIC.to_bytes(8, "big")


TLSServer = Callable[..., Path]


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, creds: Creds, module_image: Path
) -> Iterator[TLSServer]:
    """``tls_server(*extra_flags)``: the socket of a server with ``--tls-creds`` and those
    flags, started on first use and shared by the module's tests (starts cost ~1.5 s)."""
    sockdir = Path(tempfile.mkdtemp(prefix="nbdh-"))
    servers = Servers(tmp_path_factory.mktemp("tls"), sockdir)
    started: dict[tuple[str, ...], Server] = {}

    def get(*extra: str) -> Path:
        if extra not in started:
            # Images are locked by their server: the default configuration gets the module's
            # image (which tests inspect), others a fresh one each.
            image = module_image
            if extra:
                image = servers.logdir / f"disk{len(started)}.img"
                image.write_bytes(b"")
                os.truncate(image, 64 * MiB)
            started[extra] = servers(
                "--tls-creds", str(creds.server), *extra, "-f", "raw", str(image)
            )
        server = started[extra]
        assert server.alive(), f"server died:\n{server.log_tail()}"
        return server.sock

    yield get
    servers.finish()
    shutil.rmtree(sockdir, ignore_errors=True)


def _starttls(s: nbd.Sock, creds_dir: Path) -> ssl.SSLSocket:
    s.sendall(nbd.option(nbd.OPT_STARTTLS))
    _, r = nbd.read_final_reply(s)
    assert r.type == nbd.REP_ACK, hex(r.type)
    assert isinstance(s, socket.socket)
    return nbd.tls_wrap(s, creds_dir)


# Real clients.


def test_libnbd_reads_and_writes_over_tls(
    tls_server: TLSServer, creds: Creds, module_image: Path
) -> None:
    sock = tls_server()
    out = libnbd.check(
        libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock), certs=str(creds.client),
        tls="require",
    )  # fmt: skip
    assert out.strip() == "tls"
    assert module_image.read_bytes()[65536 : 65536 + 65536] == bytes(range(256)) * 256


def test_creds_alone_mean_tls_required(tls_server: TLSServer, creds: Creds) -> None:
    sock = tls_server()
    out = libnbd.check(libnbd.MUST_FAIL, sock=str(sock), certs=None, tls="disable")
    assert "refused" in out
    # A client that merely allows TLS upgrades and gets through.
    out = libnbd.check(
        libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock), certs=str(creds.client),
        tls="allow",
    )  # fmt: skip
    assert out.strip() == "tls"


def test_tls_on_serves_plaintext_and_tls_clients(tls_server: TLSServer, creds: Creds) -> None:
    sock = tls_server("--tls", "on")
    for tls, want in (("disable", "plain"), ("require", "tls")):
        out = libnbd.check(
            libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock), certs=str(creds.client),
            tls=tls,
        )  # fmt: skip
        assert out.strip() == want


def _qemu_tls(creds_dir: Path, sock: Path) -> list[str]:
    return [
        "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds_dir}",
        "--image-opts",
        f"driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0,tls-hostname=localhost",
    ]  # fmt: skip


def test_qemu_img_and_qemu_io_over_tls(
    tls_server: TLSServer, creds: Creds, module_image: Path
) -> None:
    sock = tls_server()
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", *_qemu_tls(creds.client, sock)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert info.returncode == 0, info.stderr
    assert '"virtual-size": 67108864' in info.stdout
    io = subprocess.run(
        ["qemu-io", *_qemu_tls(creds.client, sock),
         "-c", "write -P 0x5a 1M 256k", "-c", "flush", "-c", "read -P 0x5a 1M 256k"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io
    assert module_image.read_bytes()[1 << 20 : (1 << 20) + 262144] == b"\x5a" * 262144


@pytest.mark.parametrize("who", ["client_nocert", "client_otherca"])
def test_client_without_a_trusted_certificate_is_refused(
    tls_server: TLSServer, creds: Creds, who: str
) -> None:
    sock = tls_server()
    certs = getattr(creds, who)
    libnbd.check(libnbd.MUST_FAIL, sock=str(sock), certs=str(certs), tls="require")
    qemu = subprocess.run(
        ["qemu-img", "info", *_qemu_tls(certs, sock)], capture_output=True, timeout=60
    )
    assert qemu.returncode != 0
    libnbd.check(libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock),
                 certs=str(creds.client), tls="require")  # fmt: skip


def test_verify_peer_off_accepts_a_client_without_certificate(
    tls_server: TLSServer, creds: Creds
) -> None:
    sock = tls_server("--tls-verify-peer", "off")
    out = libnbd.check(
        libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock), certs=str(creds.client_nocert),
        tls="require",
    )  # fmt: skip
    assert out.strip() == "tls"


@pytest.mark.parametrize(
    ("allowed", "ok"),
    [
        (["bob", f"CN={CLIENT_CN}"], False),  # a partial DN is not the DN
        (["bob", CLIENT_CN], True),
        ([f"O={CLIENT_O},CN={CLIENT_CN}"], True),
    ],
)
def test_tls_authz(tls_server: TLSServer, creds: Creds, allowed: list[str], ok: bool) -> None:
    authz = [arg for name in allowed for arg in ("--tls-authz", name)]
    sock = tls_server(*authz)
    script = libnbd.CONNECT_TLS + libnbd.READ_WRITE if ok else libnbd.MUST_FAIL
    out = libnbd.check(script, sock=str(sock), certs=str(creds.client), tls="require")
    assert out.strip() == "tls" if ok else out.startswith("refused")


# The TLS gate, byte by byte.

OPTIONS_BEFORE_TLS = [
    (nbd.OPT_LIST, b""),
    (nbd.OPT_INFO, nbd.go_data(b"")),
    (nbd.OPT_GO, nbd.go_data(b"")),
    (nbd.OPT_STRUCTURED_REPLY, b""),
    (nbd.OPT_SET_META_CONTEXT, b"\0\0\0\0\0\0\0\x01\0\0\0\x0fbase:allocation"),
    (99, b"whatever"),
]


def test_every_option_before_starttls_gets_tls_reqd(tls_server: TLSServer, creds: Creds) -> None:
    sock = tls_server()
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags())
        for opt, data in OPTIONS_BEFORE_TLS:
            s.sendall(nbd.option(opt, data))
            infos, r = nbd.read_final_reply(s)
            assert (r.opt, r.type, infos) == (opt, nbd.REP_ERR_TLS_REQD, []), hex(r.type)
        # Still in step: STARTTLS then works, and afterwards TLS_REQD is never sent again.
        t = _starttls(s, creds.client)
        for opt, data in OPTIONS_BEFORE_TLS[:2]:
            t.sendall(nbd.option(opt, data))
            assert nbd.read_final_reply(t)[1].type != nbd.REP_ERR_TLS_REQD
        size, _ = nbd.negotiate(t)
        assert size == 64 << 20
        t.sendall(nbd.request(nbd.CMD_READ, 1, 0, 4096))
        assert nbd.read_reply_of(t, 0, 4096).error == 0


def test_abort_before_starttls_still_works(tls_server: TLSServer, creds: Creds) -> None:
    sock = tls_server()
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_ABORT))
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ACK
        assert nbd.wait_closed(s, timeout=5) == b""


def test_export_name_before_starttls_disconnects(tls_server: TLSServer, creds: Creds) -> None:
    sock = tls_server()
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_EXPORT_NAME, b""))
        assert nbd.wait_closed(s, timeout=5) == b""


def test_starttls_with_data_or_twice_is_invalid(tls_server: TLSServer, creds: Creds) -> None:
    sock = tls_server()
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_STARTTLS, b"x"))
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ERR_INVALID
        t = _starttls(s, creds.client)
        t.sendall(nbd.option(nbd.OPT_STARTTLS))
        assert nbd.read_final_reply(t)[1].type == nbd.REP_ERR_INVALID
        nbd.negotiate(t)


def test_starttls_refused_when_tls_is_off(serve: Servers, image: Path) -> None:
    server = serve("--tls", "off", "-f", "raw", str(image))
    with nbd.connect(server.sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_STARTTLS))
        r = nbd.read_final_reply(s)[1]
        assert r.type in (nbd.REP_ERR_POLICY, nbd.REP_ERR_UNSUP), hex(r.type)
        nbd.negotiate(s)


def test_nothing_negotiated_before_starttls_survives(tls_server: TLSServer, creds: Creds) -> None:
    # nbdkit CVE-2021-3716: a plaintext STRUCTURED_REPLY (injectable by a man in the middle)
    # stayed in effect inside the TLS session.
    sock = tls_server("--tls", "on")
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_STRUCTURED_REPLY))
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ACK
        s.sendall(nbd.option(nbd.OPT_SET_META_CONTEXT, OPTIONS_BEFORE_TLS[4][1]))
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ACK
        t = _starttls(s, creds.client)
        _, tflags = nbd.negotiate(t)
        assert not tflags & nbd.FLAG_SEND_DF  # DF is only for structured replies
        t.sendall(nbd.request(nbd.CMD_READ, 1, 0, 4096))
        r = nbd.read_reply_of(t, 0, 4096)
        assert (r.structured, r.error) == (False, 0)
        t.sendall(nbd.request(7, 2, 0, 4096))  # BLOCK_STATUS: no context selected any more
        r = nbd.read_reply_of(t)
        assert (r.structured, r.error) == (False, 22)


def test_plaintext_sent_after_starttls_is_never_acted_on(
    tls_server: TLSServer, creds: Creds
) -> None:
    sock = tls_server()
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        # STARTTLS and, in the same segment, a plaintext GO the server must not answer. It
        # may ACK the STARTTLS and then fail the TLS handshake, or hang up at once.
        s.sendall(
            nbd.client_flags() + nbd.option(nbd.OPT_STARTTLS) + nbd.option(nbd.OPT_GO, b"\0" * 6)
        )
        got = nbd.wait_closed(s, timeout=5)
        ack = REP_MAGIC_BYTES + struct.pack(">III", nbd.OPT_STARTTLS, nbd.REP_ACK, 0)
        if got.startswith(ack):
            got = got[len(ack) :]
        assert REP_MAGIC_BYTES not in got


def test_stalled_tls_handshakes_are_dropped(tls_server: TLSServer, creds: Creds) -> None:
    # The handshake time limit covers the TLS handshake and the options after it: a client
    # that stops after the STARTTLS ACK, or after TLS but before GO, cannot hold on forever.
    sock = tls_server("--handshake-timeout", "1")
    stalled_in_tls = nbd.connect(sock)
    nbd.greeting(stalled_in_tls)
    stalled_in_tls.sendall(nbd.client_flags() + nbd.option(nbd.OPT_STARTTLS))
    assert nbd.read_final_reply(stalled_in_tls)[1].type == nbd.REP_ACK
    stalled_after_tls = nbd.connect(sock)
    nbd.greeting(stalled_after_tls)
    stalled_after_tls.sendall(nbd.client_flags())
    t = _starttls(stalled_after_tls, creds.client)
    for s in (stalled_in_tls, t):
        nbd.wait_closed(s, timeout=10)
        s.close()
    libnbd.check(libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock),
                 certs=str(creds.client), tls="require")  # fmt: skip


def test_failed_tls_handshake_does_not_hurt_the_server(tls_server: TLSServer, creds: Creds) -> None:
    sock = tls_server()
    for junk in (b"", b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.0\r\n\r\n" * 10):
        with nbd.connect(sock) as s:
            nbd.greeting(s)
            s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_STARTTLS))
            assert nbd.read_final_reply(s)[1].type == nbd.REP_ACK
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            nbd.wait_closed(s, timeout=5)
    libnbd.check(libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock),
                 certs=str(creds.client), tls="require")  # fmt: skip


# Start-up errors: one line naming the problem, exit 1, no traceback.


def test_bad_tls_configuration_is_one_clear_line(tmp_path: Path, creds: Creds) -> None:
    no_key = tmp_path / "creds"
    no_key.mkdir()
    for f in ("ca-cert.pem", "server-cert.pem"):
        (no_key / f).write_bytes((creds.server / f).read_bytes())
    cases = [
        (["--tls-creds", "/nonexistent/creds"], "/nonexistent/creds"),
        (["--tls", "require"], "--tls-creds"),
        (["--tls-creds", str(no_key)], "server-key.pem"),
    ]
    procs = [  # started together: each costs an interpreter start-up
        subprocess.Popen(
            [*NBDSERVE, *args, "-k", str(tmp_path / f"s{i}"), "memory:1M"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for i, (args, _) in enumerate(cases)
    ]
    for i, (proc, (args, needle)) in enumerate(zip(procs, cases, strict=True)):
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, (args, err)
        assert needle in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / f"s{i}").exists()  # refused before listening
