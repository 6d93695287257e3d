"""Seeded random workloads through libnbd: many requests in flight on several connections."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from tests.interop._server import ImageFactory, MiB, ServeFactory, Transport
from tests.interop._tools import libnbd_python


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
    for run in re.finditer(rb"\x01+", known):
        lo, hi = run.span()
        assert on_disk[lo:hi] == model[lo:hi], f"image file differs from model in [{lo}, {hi})"


def test_workload_detects_corruption(serve: ServeFactory, make_image: ImageFactory) -> None:
    # Guards the checker: with one model byte flipped, the workload must report that byte.
    image = make_image(4 * MiB, {0: b"\x10" * (4 * MiB)})
    server = serve("-f", "raw", str(image))
    result = libnbd_python("libnbd_workload.py", server.uri(), "--requests", "50",
                           "--connections", "1", "--self-test-flip", "1234",
                           server=server, expect_rc=1)
    assert "MISMATCH" in result.stderr and "byte 1234" in result.stderr, result.stderr
