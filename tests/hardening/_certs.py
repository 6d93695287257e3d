"""X.509 test credentials made with the ``openssl`` CLI, laid out as qemu and libnbd expect.

qemu's server layout is ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``; a client
(qemu ``tls-creds-x509,endpoint=client`` or libnbd ``set_tls_certificates``) reads
``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``. EC keys keep generation fast.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENT_CN = "alice"
CLIENT_O = "nbdserve tests"
# qemu/gnutls print the subject in RFC 4514 order: last RDN first.
CLIENT_DN = f"CN={CLIENT_CN},O={CLIENT_O}"


@dataclass(frozen=True)
class Creds:
    server: Path  # ca-cert.pem, server-cert.pem, server-key.pem
    client: Path  # good client: ca-cert.pem, client-cert.pem, client-key.pem (CN=alice)
    client_nocert: Path  # trusts our CA, presents no certificate
    client_otherca: Path  # trusts our CA, presents a certificate from another CA
    other_ca: Path  # the other CA alone (ca-cert.pem), for clients that must not trust us


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}-key.pem", directory / f"{name}-cert.pem"
    _key(key)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", cert, "-days", "30", "-subj",
        f"/O=nbdserve tests/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def _leaf(
    directory: Path, name: str, subj: str, ca: tuple[Path, Path], ext: str
) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}{s}" for s in ("-key.pem", ".csr", "-cert.pem"))
    extfile = directory / f"{name}.ext"
    extfile.write_text(ext)
    _key(key)
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", subj)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
        "-out", cert, "-days", "30", "-extfile", extfile,
    )  # fmt: skip
    return key, cert


def _layout(directory: Path, ca_cert: Path, role: str, leaf: tuple[Path, Path] | None) -> Path:
    directory.mkdir()
    shutil.copy(ca_cert, directory / "ca-cert.pem")
    if leaf is not None:
        shutil.copy(leaf[0], directory / f"{role}-key.pem")
        shutil.copy(leaf[1], directory / f"{role}-cert.pem")
    return directory


def make_creds(root: Path) -> Creds:
    work = root / "pki"
    work.mkdir()
    ca = _ca(work, "ca")
    other = _ca(work, "otherca")
    common = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    server = _leaf(
        work, "server", "/O=nbdserve tests/CN=localhost", ca,
        common + "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )  # fmt: skip
    client_ext = common + "extendedKeyUsage=clientAuth\n"
    client = _leaf(work, "client", f"/O={CLIENT_O}/CN={CLIENT_CN}", ca, client_ext)
    stranger = _leaf(work, "stranger", f"/O={CLIENT_O}/CN={CLIENT_CN}", other, client_ext)
    return Creds(
        server=_layout(root / "server", ca[1], "server", server),
        client=_layout(root / "client", ca[1], "client", client),
        client_nocert=_layout(root / "client-nocert", ca[1], "client", None),
        client_otherca=_layout(root / "client-otherca", ca[1], "client", stranger),
        other_ca=_layout(root / "other-ca", other[1], "client", None),
    )
