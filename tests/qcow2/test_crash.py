"""SIGKILL in the middle of a write workload: ``qemu-img check`` may find leaked clusters but
never corruption, and every write acknowledged before the last completed flush is there."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from nbdserve.block.qcow2 import create_qcow2

from .crash_worker import BLOCK, pattern
from .helpers import check_image, raw_of

WORKER = Path(__file__).with_name("crash_worker.py")


@pytest.mark.parametrize(("cs", "flushes"), [(65536, 6), (512, 6), (4096, 25)])
async def test_sigkill_mid_workload(tmp_path: Path, cs: int, flushes: int) -> None:
    img = tmp_path / "crash.qcow2"
    await create_qcow2(img, 24 << 20, cluster_size=cs)
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(img), str(cs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    durable: list[int] = []
    seen = 0
    try:
        with trio.fail_after(60):
            while seen < flushes:
                line = await trio.to_thread.run_sync(proc.stdout.readline)
                assert line, "worker exited early: " + (proc.stderr.read() if proc.stderr else "")
                assert not line.startswith("DONE"), "workload finished before the kill"
                assert line.startswith("F")
                durable += [int(x) for x in line.split()[1:]]
                seen += 1
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert durable, "no write was acknowledged before a flush"

    info = check_image(img)
    assert info.get("corruptions", 0) == 0 and info["returncode"] in (0, 3), info
    data = raw_of(img, tmp_path)
    missing = [i for i in durable if data[i * BLOCK : (i + 1) * BLOCK] != pattern(i)]
    assert not missing, f"{len(missing)} flushed blocks lost, e.g. {missing[:5]}"
