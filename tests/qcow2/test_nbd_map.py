"""Over NBD, ``qemu-img map`` of a qcow2 image served by nbdserve equals the map of the same
image served by qemu-nbd: base:allocation and qemu:allocation-depth."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import qemu_img_create, qemu_io, run
from .test_read_qemu_images import _chain3, _compressed

SERVERS = {
    "nbdserve": [sys.executable, "-c", "import sys; from nbdserve.cli import main; "
                 "sys.argv[0] = 'nbdserve'; sys.exit(main())"],
    "qemu-nbd": [shutil.which("qemu-nbd") or "qemu-nbd"],
}


@contextlib.contextmanager
def serving(server: str, image: Path, sock: Path) -> Iterator[None]:
    cmd = [*SERVERS[server], "-r", "-t", "-A", "-f", "qcow2", "-k", str(sock), str(image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, f"{server} did not start"
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def _maps(image: Path, sock: Path) -> tuple[str, str]:
    uri = f"nbd+unix:///?socket={sock}"
    base = run("qemu-img", "map", "--output=json", uri).stdout
    depth = run(
        "qemu-img", "map", "--output=json", "--image-opts",
        f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:allocation-depth",
    ).stdout
    return base, depth


def _zero_clusters(tmp: Path) -> Path:
    img = qemu_img_create(tmp / "z.qcow2", 4 << 20, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 1M", "write -z 256k 64k", "write -z -u 512k 8k",
            "write -z 2M 100k", "discard 700k 4k")
    return img


@pytest.mark.parametrize("make", [_chain3, _compressed, _zero_clusters],
                         ids=["chain3", "compressed", "zero-clusters"])
def test_map_over_nbd_matches_qemu_nbd(tmp_path: Path, make: object) -> None:
    image = make(tmp_path)  # type: ignore[operator]
    results = {}
    for server in SERVERS:
        sock = tmp_path / f"{server}.sock"
        with serving(server, image, sock):
            results[server] = _maps(image, sock)
    ours, theirs = results["nbdserve"], results["qemu-nbd"]
    assert ours[0] == theirs[0], "base:allocation differs"
    assert ours[1] == theirs[1], "qemu:allocation-depth differs"
