"""fio's nbd engine: two jobs (two connections) write random 4 KiB blocks, then verify them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.interop._server import MiB, RunningServer, ServeFactory
from tests.interop._tools import run

JOB = """\
[global]
ioengine=nbd
uri={uri}
rw=randwrite
bs=4k
iodepth=16
size=8M
verify=crc32c
verify_fatal=1
do_verify=1
verify_state_save=0
{extra}
[first-half]
offset=0
[second-half]
offset=8M
"""


def fio_json(stdout: str) -> dict[str, Any]:
    # The nbd engine prints "fio: connected to NBD server" before the JSON document.
    result: dict[str, Any] = json.loads(stdout[stdout.index("{"):])
    return result


def run_fio(server: RunningServer, tmp_path: Path, extra: str = "",
            expect_rc: int | None = 0) -> tuple[int, str]:
    job = tmp_path / "verify.fio"
    job.write_text(JOB.format(uri=server.uri(), extra=extra))
    result = run(["fio", "--output-format=json", str(job)], server=server,
                 expect_rc=expect_rc, timeout=90, cwd=tmp_path)
    return result.returncode, result.stdout


def test_fio_randwrite_then_verify(server: RunningServer, tmp_path: Path) -> None:
    _, stdout = run_fio(server, tmp_path)
    jobs = fio_json(stdout)["jobs"]
    assert [j["jobname"] for j in jobs] == ["first-half", "second-half"]
    for job in jobs:
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == 8 * MiB
        assert job["read"]["io_bytes"] == 8 * MiB  # the verify pass read everything back


def test_fio_verify_fails_on_data_it_did_not_write(serve: ServeFactory, image: Path,
                                                   tmp_path: Path) -> None:
    # Guards the test above: verification really compares data.
    server = serve("-f", "raw", str(image))
    rc, _ = run_fio(server, tmp_path, extra="verify_only=1", expect_rc=None)
    assert rc != 0
