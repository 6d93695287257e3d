"""STARTTLS end to end: nbdserve's ``--tls*`` flags driven by libnbd, qemu and a raw client.

Flags under test (nbdkit's meanings, qemu's credentials layout):
``--tls-creds DIR`` (alone: TLS required), ``--tls off|on|require``,
``--tls-verify-peer on|off`` (default on, as qemu), ``--tls-authz NAME`` (repeatable; a
certificate's CN or its full DN as qemu prints it).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from . import _libnbd as libnbd
from . import _nbdraw as nbd
from ._certs import CLIENT_CN, CLIENT_O, Creds
from ._server import NBDSERVE, env
from .conftest import Serve

pytestmark = pytest.mark.usefixtures("nbdserve_only")

REP_MAGIC_BYTES = nbd.REP_MAGIC.to_bytes(8, "big")


def _tls_server(serve: Serve, creds: Creds, image: Path, *extra: str) -> Path:
    return serve("--tls-creds", str(creds.server), *extra, "-f", "raw", str(image)).sock


def _starttls(s: nbd.Sock, creds_dir: Path) -> ssl.SSLSocket:
    s.sendall(nbd.option(nbd.OPT_STARTTLS))
    _, r = nbd.read_final_reply(s)
    assert r.type == nbd.REP_ACK, hex(r.type)
    assert isinstance(s, socket.socket)
    return nbd.tls_wrap(s, creds_dir)


# Real clients.


def test_libnbd_reads_and_writes_over_tls(serve: Serve, creds: Creds, image: Path) -> None:
    sock = _tls_server(serve, creds, image)
    out = libnbd.check(
        libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock), certs=str(creds.client),
        tls="require",
    )  # fmt: skip
    assert out.strip() == "tls"
    assert image.read_bytes()[65536 : 65536 + 65536] == bytes(range(256)) * 256


def test_creds_alone_mean_tls_required(serve: Serve, creds: Creds, image: Path) -> None:
    sock = _tls_server(serve, creds, image)
    out = libnbd.check(libnbd.MUST_FAIL, sock=str(sock), certs=None, tls="disable")
    assert "refused" in out
    # A client that merely allows TLS upgrades and gets through.
    out = libnbd.check(
        libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock), certs=str(creds.client),
        tls="allow",
    )  # fmt: skip
    assert out.strip() == "tls"


def test_tls_on_serves_plaintext_and_tls_clients(serve: Serve, creds: Creds, image: Path) -> None:
    sock = _tls_server(serve, creds, image, "--tls", "on")
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


def test_qemu_img_and_qemu_io_over_tls(serve: Serve, creds: Creds, image: Path) -> None:
    sock = _tls_server(serve, creds, image)
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
    assert image.read_bytes()[1 << 20 : (1 << 20) + 262144] == b"\x5a" * 262144


@pytest.mark.parametrize("who", ["client_nocert", "client_otherca"])
def test_client_without_a_trusted_certificate_is_refused(
    serve: Serve, creds: Creds, image: Path, who: str
) -> None:
    sock = _tls_server(serve, creds, image)
    certs = getattr(creds, who)
    libnbd.check(libnbd.MUST_FAIL, sock=str(sock), certs=str(certs), tls="require")
    qemu = subprocess.run(
        ["qemu-img", "info", *_qemu_tls(certs, sock)], capture_output=True, timeout=60
    )
    assert qemu.returncode != 0
    libnbd.check(libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock),
                 certs=str(creds.client), tls="require")  # fmt: skip


def test_verify_peer_off_accepts_a_client_without_certificate(
    serve: Serve, creds: Creds, image: Path
) -> None:
    sock = _tls_server(serve, creds, image, "--tls-verify-peer", "off")
    out = libnbd.check(
        libnbd.CONNECT_TLS + libnbd.READ_WRITE, sock=str(sock), certs=str(creds.client_nocert),
        tls="require",
    )  # fmt: skip
    assert out.strip() == "tls"


@pytest.mark.parametrize(
    ("allowed", "ok"),
    [
        (["bob"], False),
        (["bob", CLIENT_CN], True),
        ([f"O={CLIENT_O},CN={CLIENT_CN}"], True),
        ([f"CN={CLIENT_CN}"], False),
    ],
)
def test_tls_authz(serve: Serve, creds: Creds, image: Path, allowed: list[str], ok: bool) -> None:
    authz = [arg for name in allowed for arg in ("--tls-authz", name)]
    sock = _tls_server(serve, creds, image, *authz)
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


def test_every_option_before_starttls_gets_tls_reqd(
    serve: Serve, creds: Creds, image: Path
) -> None:
    sock = _tls_server(serve, creds, image)
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


def test_abort_before_starttls_still_works(serve: Serve, creds: Creds, image: Path) -> None:
    sock = _tls_server(serve, creds, image)
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_ABORT))
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ACK
        assert nbd.wait_closed(s, timeout=5) == b""


def test_export_name_before_starttls_disconnects(serve: Serve, creds: Creds, image: Path) -> None:
    sock = _tls_server(serve, creds, image)
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_EXPORT_NAME, b""))
        assert nbd.wait_closed(s, timeout=5) == b""


def test_starttls_with_data_or_twice_is_invalid(serve: Serve, creds: Creds, image: Path) -> None:
    sock = _tls_server(serve, creds, image)
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_STARTTLS, b"x"))
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ERR_INVALID
        t = _starttls(s, creds.client)
        t.sendall(nbd.option(nbd.OPT_STARTTLS))
        assert nbd.read_final_reply(t)[1].type == nbd.REP_ERR_INVALID
        nbd.negotiate(t)


def test_starttls_refused_when_tls_is_off(serve: Serve, image: Path) -> None:
    server = serve("--tls", "off", "-f", "raw", str(image))
    with nbd.connect(server.sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_STARTTLS))
        r = nbd.read_final_reply(s)[1]
        assert r.type in (nbd.REP_ERR_POLICY, nbd.REP_ERR_UNSUP), hex(r.type)
        nbd.negotiate(s)


def test_nothing_negotiated_before_starttls_survives(
    serve: Serve, creds: Creds, image: Path
) -> None:
    # nbdkit CVE-2021-3716: a plaintext STRUCTURED_REPLY (injectable by a man in the middle)
    # stayed in effect inside the TLS session.
    sock = _tls_server(serve, creds, image, "--tls", "on")
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
    serve: Serve, creds: Creds, image: Path
) -> None:
    sock = _tls_server(serve, creds, image)
    with nbd.connect(sock) as s:
        nbd.greeting(s)
        # STARTTLS and, in the same segment, a plaintext GO the server must not answer.
        s.sendall(
            nbd.client_flags() + nbd.option(nbd.OPT_STARTTLS) + nbd.option(nbd.OPT_GO, b"\0" * 6)
        )
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ACK
        rest = nbd.wait_closed(s, timeout=5)
        assert REP_MAGIC_BYTES not in rest


def test_failed_tls_handshake_does_not_hurt_the_server(
    serve: Serve, creds: Creds, image: Path
) -> None:
    sock = _tls_server(serve, creds, image)
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


# Start-up errors.


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tls-creds", "/nonexistent/creds"], "/nonexistent/creds"),
        (["--tls", "require"], "--tls-creds"),
    ],
)
def test_bad_tls_configuration_is_one_clear_line(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    r = subprocess.run(
        [*NBDSERVE, *args, "-k", str(tmp_path / "s"), "memory:1M"],
        capture_output=True, text=True, timeout=30, env=env(),
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_server_key_is_named(tmp_path: Path, creds: Creds) -> None:
    d = tmp_path / "creds"
    d.mkdir()
    for f in ("ca-cert.pem", "server-cert.pem"):
        (d / f).write_bytes((creds.server / f).read_bytes())
    r = subprocess.run(
        [*NBDSERVE, "--tls-creds", str(d), "-k", str(tmp_path / "s"), "memory:1M"],
        capture_output=True, text=True, timeout=30, env=env(),
    )  # fmt: skip
    assert r.returncode == 1
    assert "server-key.pem" in r.stderr and "Traceback" not in r.stderr
