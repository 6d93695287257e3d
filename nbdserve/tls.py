"""TLS for NBD's STARTTLS: X.509 credentials in qemu's layout, and client authorisation.

``server_context(creds_dir)`` reads the directory layout qemu's ``tls-creds-x509`` uses for a
server endpoint::

    ca-cert.pem      the CA that signs client certificates (and that clients trust)
    server-cert.pem  this server's certificate (chain)
    server-key.pem   its private key, unencrypted
    dh-params.pem    optional Diffie-Hellman parameters, as qemu accepts them

It returns an ``ssl.SSLContext`` for ``trio.SSLStream(..., server_side=True)``: TLS 1.2 or later
(the NBD spec's floor), and, like qemu's default ``verify-peer=on``, a client certificate is
required and verified against ``ca-cert.pem``. ``verify_peer=False`` accepts clients without
certificates (encryption only, no client identity).

``check_authz(ssl_object, allowed)`` is qemu's ``--tls-authz``: after the handshake it returns
``None`` when the client's certificate subject is listed, else the reason for refusing. An
entry matches either

* the subject's common name alone, e.g. ``alice``; or
* the whole distinguished name exactly as qemu (gnutls) prints it: the RDNs in certificate
  order, short attribute names, joined by commas, e.g. ``O=Example Org,CN=alice`` for a
  certificate made with ``-subj "/O=Example Org/CN=alice"``.

Authorisation needs a verified client certificate, so it only makes sense with
``verify_peer=True``; without a certificate every client is refused.

TLS-PSK (nbdkit's ``--tls-psk``, qemu's ``tls-creds-psk``) is **not available**: Python's
``ssl`` module gained ``SSLContext.set_psk_server_callback`` only in Python 3.13, and this
project runs on Python 3.11, whose ``ssl`` has no way to offer PSK cipher suites to a client.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

__all__ = ["TLSCredsError", "check_authz", "peer_names", "server_context"]

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
DH_PARAMS = "dh-params.pem"

# Short names as gnutls (and so qemu's authz) prints them.
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
    "serialNumber": "serialNumber",
    "title": "title",
    "givenName": "givenName",
    "surname": "surName",
}


class TLSCredsError(ValueError):
    """A credentials file is missing or unusable; the message is one line naming the file."""


class HasPeerCert(Protocol):
    """``ssl.SSLObject``, ``ssl.SSLSocket`` and ``trio.SSLStream`` all qualify."""

    def getpeercert(self) -> Any: ...


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey


def _require(path: Path) -> Path:
    if not path.is_file():
        raise TLSCredsError(f"TLS credentials: {path}: missing (expected a PEM file)")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise TLSCredsError(f"TLS credentials: {path}: cannot read: {e.strerror}") from None
    return path


def server_context(creds_dir: Path, *, verify_peer: bool = True) -> ssl.SSLContext:
    """An SSL context for the server side of STARTTLS from qemu's credentials layout."""
    creds_dir = Path(creds_dir)
    if not creds_dir.is_dir():
        raise TLSCredsError(f"TLS credentials: {creds_dir}: not a directory")
    ca, cert, key = (_require(creds_dir / n) for n in (CA_CERT, SERVER_CERT, SERVER_KEY))

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError:
        raise TLSCredsError(f"TLS credentials: {ca}: no valid PEM certificate") from None

    # load_cert_chain reports "PEM lib" for either file; try the certificate alone first so
    # the error names the file that is actually wrong.
    try:
        ssl.create_default_context(cadata=cert.read_text("ascii", errors="replace"))
    except (ssl.SSLError, ValueError):
        raise TLSCredsError(f"TLS credentials: {cert}: no valid PEM certificate") from None
    try:
        # The password callback keeps OpenSSL from prompting on the terminal (a daemon would
        # hang) when the key is encrypted.
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key), password=_no_password)
    except _EncryptedKey:
        raise TLSCredsError(
            f"TLS credentials: {key}: encrypted private keys are not supported"
        ) from None
    except ssl.SSLError as e:
        problem = (
            f"does not match {cert.name}"
            if "KEY_VALUES_MISMATCH" in str(e)
            else "not a valid unencrypted PEM private key"
        )
        raise TLSCredsError(f"TLS credentials: {key}: {problem}") from None

    dh = creds_dir / DH_PARAMS
    if dh.exists():
        try:
            ctx.load_dh_params(str(dh))
        except (ssl.SSLError, OSError):
            raise TLSCredsError(f"TLS credentials: {dh}: not valid PEM DH parameters") from None

    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    # NBD needs no session resumption across connections; tickets would only be state to leak.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def _escape(value: str) -> str:
    """RFC 4514 escaping of an attribute value, as gnutls applies it."""
    last = len(value) - 1
    out = []
    for i, ch in enumerate(value):
        if ch == "\0":
            out.append("\\00")
        elif ch in ',+"\\<>;' or (i == 0 and ch in " #") or (i == last and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def peer_names(ssl_object: HasPeerCert) -> tuple[str, str] | None:
    """The verified peer certificate's (common name, distinguished name), or None.

    The DN is in the form qemu prints and matches: RDNs in certificate order, short names,
    comma-joined; attributes of a multi-valued RDN joined with ``+``.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    rdns: list[str] = []
    cn = ""
    for rdn in cert.get("subject", ()):
        parts = []
        for name, value in rdn:
            if name == "commonName":
                cn = value
            parts.append(f"{_SHORT_NAMES.get(name, name)}={_escape(value)}")
        rdns.append("+".join(parts))
    return cn, ",".join(rdns)


def check_authz(ssl_object: HasPeerCert, allowed: Collection[str]) -> str | None:
    """None if the peer's certificate CN or full DN is in ``allowed``, else why not."""
    names = peer_names(ssl_object)
    if names is None:
        return "client presented no verified certificate"
    cn, dn = names
    if (cn and cn in allowed) or dn in allowed:
        return None
    return f"client certificate {dn!r} is not in the TLS authorisation list"
