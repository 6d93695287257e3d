"""nbdserve.tls in isolation: credentials loading and client authorisation over in-memory TLS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import nbdserve.tls
from nbdserve.tls import TLSCredsError, check_authz, peer_names, server_context

from ._certs import CLIENT_CN, CLIENT_O, Creds


def _client_context(creds_dir: Path, *, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(creds_dir / "ca-cert.pem"))
    if with_cert and (creds_dir / "client-cert.pem").exists():
        ctx.load_cert_chain(creds_dir / "client-cert.pem", creds_dir / "client-key.pem")
    return ctx


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a full TLS handshake through memory BIOs; raises ssl.SSLError on refusal."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"server": False, "client": False}
    for _ in range(20):
        for name, obj, out, peer_in in (
            ("client", client, c_out, s_in),
            ("server", server, s_out, c_in),
        ):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            # TLS 1.3: the server learns of a rejected client certificate only when the client
            # sends data; push one record through so refusals surface on both sides.
            client.write(b"x")
            s_in.write(c_out.read())
            assert server.read(1) == b"x"
            return server, client
    raise AssertionError("handshake did not finish")


def copy_server_creds(creds: Creds, dest: Path) -> Path:
    shutil.copytree(creds.server, dest)
    return dest


def test_context_floor_and_peer_verification(creds: Creds) -> None:
    ctx = server_context(creds.server)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert server_context(creds.server, verify_peer=False).verify_mode == ssl.CERT_NONE


def test_good_client_is_accepted_and_named(creds: Creds) -> None:
    server, _ = _handshake(server_context(creds.server), _client_context(creds.client))
    assert server.version() in ("TLSv1.2", "TLSv1.3")
    assert peer_names(server) == (CLIENT_CN, f"O={CLIENT_O},CN={CLIENT_CN}")


@pytest.mark.parametrize("which", ["client_nocert", "client_otherca"])
def test_client_without_trusted_cert_is_refused(creds: Creds, which: str) -> None:
    with pytest.raises(ssl.SSLError):
        _handshake(server_context(creds.server), _client_context(getattr(creds, which)))


def test_verify_peer_off_accepts_anonymous_client(creds: Creds) -> None:
    server, _ = _handshake(
        server_context(creds.server, verify_peer=False),
        _client_context(creds.client_nocert),
    )
    assert peer_names(server) is None
    assert check_authz(server, [CLIENT_CN]) == "client presented no verified certificate"


def test_client_that_does_not_trust_our_ca_aborts(creds: Creds) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_context(creds.server), _client_context(creds.other_ca))


@pytest.mark.parametrize(
    ("allowed", "ok"),
    [
        ([CLIENT_CN], True),
        ([f"O={CLIENT_O},CN={CLIENT_CN}"], True),
        (["bob", CLIENT_CN], True),
        (["bob"], False),
        ([], False),
        ([f"CN={CLIENT_CN},O={CLIENT_O}"], False),  # wrong RDN order is a different name
        ([CLIENT_CN.upper()], False),
        ([f"CN={CLIENT_CN}"], False),  # a partial DN is not the DN
    ],
)
def test_authz(creds: Creds, allowed: list[str], ok: bool) -> None:
    server, _ = _handshake(server_context(creds.server), _client_context(creds.client))
    reason = check_authz(server, allowed)
    if ok:
        assert reason is None
    else:
        assert reason is not None
        assert f"O={CLIENT_O},CN={CLIENT_CN}" in reason


def test_dn_escaping_follows_rfc4514() -> None:
    class Fake:
        def getpeercert(self) -> object:
            return {"subject": ((("organizationName", "A, B+C"),), (("commonName", " x "),))}

    assert peer_names(Fake()) == (" x ", "O=A\\, B\\+C,CN=\\ x\\ ")


@pytest.mark.parametrize("missing", ["ca-cert.pem", "server-cert.pem", "server-key.pem"])
def test_missing_file_is_named(creds: Creds, tmp_path: Path, missing: str) -> None:
    d = copy_server_creds(creds, tmp_path / "c")
    (d / missing).unlink()
    with pytest.raises(TLSCredsError, match=rf"^TLS credentials: .*/{missing}: missing"):
        server_context(d)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TLSCredsError, match="not a directory"):
        server_context(tmp_path / "nope")


@pytest.mark.parametrize("bad", ["ca-cert.pem", "server-cert.pem", "server-key.pem"])
def test_garbage_file_is_named(creds: Creds, tmp_path: Path, bad: str) -> None:
    d = copy_server_creds(creds, tmp_path / "c")
    (d / bad).write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    with pytest.raises(TLSCredsError, match=rf"^TLS credentials: .*/{bad}: ") as exc:
        server_context(d)
    assert "\n" not in str(exc.value)


def test_key_of_another_certificate_is_named(creds: Creds, tmp_path: Path) -> None:
    d = copy_server_creds(creds, tmp_path / "c")
    shutil.copy(creds.client / "client-key.pem", d / "server-key.pem")
    with pytest.raises(TLSCredsError, match=r"server-key.pem: does not match server-cert.pem"):
        server_context(d)


def test_encrypted_key_is_refused_without_prompting(creds: Creds, tmp_path: Path) -> None:
    d = copy_server_creds(creds, tmp_path / "c")
    subprocess.run(
        ["openssl", "pkey", "-in", str(creds.server / "server-key.pem"), "-aes256",
         "-passout", "pass:secret", "-out", str(d / "server-key.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    assert "ENCRYPTED" in (d / "server-key.pem").read_text()
    with pytest.raises(TLSCredsError, match=r"server-key.pem: encrypted private keys"):
        server_context(d)


def test_bad_dh_params_are_named(creds: Creds, tmp_path: Path) -> None:
    d = copy_server_creds(creds, tmp_path / "c")
    (d / "dh-params.pem").write_text("junk\n")
    with pytest.raises(TLSCredsError, match=r"dh-params.pem: not valid PEM DH parameters"):
        server_context(d)


def test_psk_statement_in_docstring_is_true() -> None:
    # The module docstring says PSK needs Python >= 3.13; if this Python grows the API, the
    # docstring (and the server) must be revisited.
    has_psk = hasattr(ssl.SSLContext, "set_psk_server_callback")
    assert has_psk == (sys.version_info >= (3, 13))
    assert nbdserve.tls.__doc__ is not None
    assert "TLS-PSK" in nbdserve.tls.__doc__ and "not available" in nbdserve.tls.__doc__
    assert not has_psk


# The DN string is what --tls-authz compares, so two different subjects must never render the
# same: the rendering must be decodable back to the subject it came from.

_ATTRS = ["commonName", "organizationName", "organizationalUnitName", "countryName"]
# Mostly the characters that matter to the syntax, some of anything else.
_values = st.text(st.sampled_from(list(' ,+"\\<>;#=\0a\u00e9')), max_size=8) | st.text(max_size=8)
_subjects = st.lists(
    st.lists(st.tuples(st.sampled_from(_ATTRS), _values), min_size=1, max_size=2),
    min_size=1,
    max_size=4,
)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\":
            cur += text[i : i + 2]
            i += 2
        elif text[i] == sep:
            parts.append(cur)
            cur, i = "", i + 1
        else:
            cur += text[i]
            i += 1
    return [*parts, cur]


def _unescape(value: str) -> str:
    out, i = "", 0
    while i < len(value):
        if value[i] == "\\":
            if value[i + 1 : i + 3] == "00":
                out, i = out + "\0", i + 3
            else:
                out, i = out + value[i + 1], i + 2
        else:
            out, i = out + value[i], i + 1
    return out


@given(_subjects)
def test_dn_rendering_is_unambiguous(subject: list[list[tuple[str, str]]]) -> None:
    class Fake:
        def getpeercert(self) -> object:
            return {"subject": tuple(tuple(rdn) for rdn in subject)}

    names = peer_names(Fake())
    assert names is not None
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C"}  # fmt: skip
    decoded = [
        [
            (attr, _unescape(value))
            for attr, value in (a.split("=", 1) for a in _split_unescaped(rdn, "+"))
        ]
        for rdn in _split_unescaped(names[1], ",")
    ]
    assert decoded == [[(short[a], v) for a, v in rdn] for rdn in subject]
