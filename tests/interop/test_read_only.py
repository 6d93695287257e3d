"""A read-only export (-r) says so, serves reads, and refuses every write with EPERM."""

from __future__ import annotations

import json

from tests.interop._server import ImageFactory, MiB, ServeFactory, ServerKind
from tests.interop._tools import (
    DEBIAN_PYTHON,
    INTEROP_DIR,
    libnbd_python,
    nbdinfo_json,
    qemu_io,
    run,
)


def expected_refusals(write_errno: str) -> dict[str, str | None]:
    return {
        "write": write_errno, "write+fua": write_errno, "write_zeroes": write_errno,
        "trim": write_errno, "read": None, "flush": None,
    }


def refusal_errno(kind: ServerKind) -> str:
    """The NBD spec asks for EPERM. qemu-nbd 7.2 answers EINVAL instead: its block layer
    fails the write with EACCES, which qemu's errno table folds into EINVAL."""
    return "EPERM" if kind == "nbdserve" else "EINVAL"


def test_read_only_export_refuses_writes_with_eperm(
    serve: ServeFactory, make_image: ImageFactory, kind: ServerKind
) -> None:
    content = b"\x42" * (256 * 1024)
    image = make_image(4 * MiB, {0: content})
    before = image.read_bytes()
    server = serve("-f", "raw", "-r", str(image))

    export = nbdinfo_json(server)["exports"][0]
    assert export["is_read_only"] is True

    probe = json.loads(libnbd_python("libnbd_readonly_probe.py", server.uri(),
                                     server=server).stdout)
    assert probe["is_read_only"] is True
    outcome = {a["command"]: a["errno"] for a in probe["attempts"]}
    assert outcome == expected_refusals(refusal_errno(kind)), probe

    # qemu's client also gives up on writing; either side may refuse, the data must not move.
    output = qemu_io(server, "write -P 0x99 0 4k", uri=server.uri(), expect_rc=None)
    assert "wrote" not in output, output
    qemu_io(server, "read -P 0x42 0 256k", "read -P 0 256k 256k", read_only=True)
    run(["nbdinfo", "--can", "write", server.uri()], server=server, expect_rc=2)
    server.stop()
    assert image.read_bytes() == before


def test_probe_sees_eperm_from_a_spec_following_server() -> None:
    # Proves the probe itself: nbdkit answers writes on a read-only export with EPERM.
    probe_script = INTEROP_DIR / "libnbd_readonly_probe.py"
    result = run(["nbdkit", "-r", "-U", "-", "memory", "1M", "--run",
                  f'{DEBIAN_PYTHON} {probe_script} "$uri"'])
    probe = json.loads(result.stdout)
    assert {a["command"]: a["errno"] for a in probe["attempts"]} == expected_refusals("EPERM")
