"""Seeded random workloads through libnbd: many requests in flight on several connections."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from tests.interop._server import ImageFactory, MiB, ServeFactory, Transport
from tests.interop._tools import libnbd_python, run


@pytest.mark.parametrize(
    ("seed", "connections", "in_flight", "requests", "discard", "transport"), [
        (1, 4, 16, 1500, "ignore", "unix"),
        (2, 2, 32, 1500, "unmap", "tcp"),
    ])
def test_random_workload_matches_model(
    serve: ServeFactory, make_image: ImageFactory, tmp_path: Path, transport: Transport,
    seed: int, connections: int, in_flight: int, requests: int, discard: str,
) -> None:
    # Random data in the first half, a hole in the second: reads of both must match.
    image = make_image(16 * MiB, {0: random.Random(seed).randbytes(8 * MiB)})
    server = serve("-f", "raw", f"--discard={discard}", str(image), transport=transport)
    model_path = tmp_path / "model.bin"
    result = libnbd_python(
        "libnbd_workload.py", server.uri(), "--seed", str(seed),
        "--connections", str(connections), "--in-flight", str(in_flight),
        "--requests", str(requests), "--model-out", str(model_path),
        server=server, timeout=150,
    )
    summary = json.loads(result.stdout)
    assert summary["requests"] == requests
    assert summary["connections"] == connections
    # The workload really overlapped requests across connections.
    assert summary["max_in_flight_seen"] > connections
    kinds = ["read", "write", "zero", "flush", "block_status"]
    if discard == "unmap":  # TRIM must then be offered, and gets exercised
        assert summary["can"]["trim"], summary
        kinds.append("trim")
    for kind in kinds:
        assert summary["counts"].get(kind, 0) > 0, summary

    server.stop()
    model = model_path.read_bytes()
    known = Path(f"{model_path}.known").read_bytes()
    on_disk = image.read_bytes()
    for known_run in re.finditer(rb"\x01+", known):
        lo, hi = known_run.span()
        assert on_disk[lo:hi] == model[lo:hi], f"image file differs from model in [{lo}, {hi})"


def test_random_workload_with_simple_replies(serve: ServeFactory,
                                             make_image: ImageFactory) -> None:
    # Without structured replies (how the Linux kernel client talks): every reply is a
    # simple one and there is no block status.
    image = make_image(16 * MiB, {MiB: random.Random(4).randbytes(4 * MiB)})
    server = serve("-f", "raw", str(image))
    result = libnbd_python("libnbd_workload.py", server.uri(), "--seed", "4",
                           "--connections", "3", "--requests", "1000", "--simple-replies",
                           server=server, timeout=150)
    summary = json.loads(result.stdout)
    assert summary["structured_replies"] is False
    assert "block_status" not in summary["counts"]
    assert summary["counts"]["read"] > 0 and summary["counts"]["write"] > 0


def test_workload_detects_corruption(serve: ServeFactory, make_image: ImageFactory) -> None:
    # Guards the checker: with one model byte flipped, the workload must report that byte.
    image = make_image(4 * MiB, {0: b"\x10" * (4 * MiB)})
    server = serve("-f", "raw", str(image))
    result = libnbd_python("libnbd_workload.py", server.uri(), "--requests", "50",
                           "--connections", "1", "--self-test-flip", "1234",
                           server=server, expect_rc=1)
    assert "MISMATCH" in result.stderr and "byte 1234" in result.stderr, result.stderr


def test_random_workload_on_qcow2_leaves_a_consistent_image(
    serve: ServeFactory, tmp_path: Path
) -> None:
    # The same workload over a qcow2 image (with a backing file), then QEMU itself judges the
    # result: `qemu-img check` for the metadata, and the converted contents against the model.
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(16 * MiB)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3a 0 6M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    server = serve("-f", "qcow2", "--discard=unmap", str(top))
    model_path = tmp_path / "model.bin"
    libnbd_python("libnbd_workload.py", server.uri(), "--seed", "3", "--connections", "2",
                  "--in-flight", "16", "--requests", "1200", "--model-out", str(model_path),
                  server=server, timeout=150)
    server.stop()
    run(["qemu-img", "check", "-q", "-f", "qcow2", str(top)])
    flat = tmp_path / "flat.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(flat)])
    model, known = model_path.read_bytes(), Path(f"{model_path}.known").read_bytes()
    data = flat.read_bytes()
    for known_run in re.finditer(rb"\x01+", known):
        lo, hi = known_run.span()
        assert data[lo:hi] == model[lo:hi], f"qcow2 contents differ from model in [{lo}, {hi})"
