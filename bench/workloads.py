"""The rows of the benchmark: fio jobs and nbdcopy copies, their command lines and results."""

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Row:
    """One workload. ``rw`` and friends are fio's; ``copy`` rows run nbdcopy instead."""

    key: str
    title: str
    rw: str = ""
    block_size: str = ""
    iodepth: int = 0
    rwmixread: int | None = None
    copy: str = ""  # "to-null" (image -> null:) or "from-file" (local file -> image)

    @property
    def small_io(self) -> bool:
        """Rows where IOPS, not MiB/s, is the headline figure."""
        return self.block_size == "4k"

    @property
    def writes(self) -> bool:
        """Rows that change the image (fio's write modes, the copy into the export)."""
        return "write" in self.rw or self.rw == "randrw" or self.copy == "from-file"


ROWS: tuple[Row, ...] = (
    Row("randread-4k-qd1", "4K random read QD1", "randread", "4k", 1),
    Row("randread-4k-qd16", "4K random read QD16", "randread", "4k", 16),
    Row("randwrite-4k-qd16", "4K random write QD16", "randwrite", "4k", 16),
    Row("randread-64k-qd8", "64K random read QD8", "randread", "64k", 8),
    Row("seqread-1m-qd8", "1M sequential read QD8", "read", "1m", 8),
    Row("seqwrite-1m-qd8", "1M sequential write QD8", "write", "1m", 8),
    Row("randrw70-4k-qd16", "4K random 70/30 read/write QD16", "randrw", "4k", 16, 70),
    Row("copy-to-null", "nbdcopy image to null:", copy="to-null"),
    Row("copy-from-file", "nbdcopy local file to image", copy="from-file"),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the client measured for one row against one server."""

    bytes_moved: int
    seconds: float
    ios: int | None  # None for nbdcopy, which does not report its request count

    @property
    def iops(self) -> float | None:
        return None if self.ios is None else self.ios / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 2**20


def fio_command(row: Row, uri: str, size: int, runtime: float) -> list[str]:
    cmd = [
        "fio", f"--name={row.key}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={row.rw}", f"--bs={row.block_size}", f"--iodepth={row.iodepth}",
        f"--size={size}", f"--runtime={int(runtime * 1000)}ms", "--time_based",
        "--output-format=json",
    ]  # fmt: skip
    if row.rwmixread is not None:
        cmd.append(f"--rwmixread={row.rwmixread}")
    return cmd


def nbdcopy_command(row: Row, uri: str, source_file: Path) -> list[str]:
    if row.copy == "to-null":
        return ["nbdcopy", uri, "null:"]
    if row.copy == "from-file":
        # --flush: the copy counts as done once the server has it stable, not merely received.
        return ["nbdcopy", "--flush", str(source_file), uri]
    raise ValueError(f"row {row.key!r} is not an nbdcopy row")


class FioOutputError(ValueError):
    """fio's output could not be read as a finished job."""


def parse_fio(output: str) -> Outcome:
    """Read fio's ``--output-format=json`` result; the nbd engine prints a line before it."""
    start = output.find("{")
    if start < 0:
        raise FioOutputError(f"no JSON in fio output: {output[:200]!r}")
    try:
        report = json.loads(output[start:])
        (job,) = report["jobs"]
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise FioOutputError(f"unreadable fio JSON: {exc}") from exc
    if job.get("error"):
        raise FioOutputError(f"fio job failed with error {job['error']}")
    moved = job["read"]["io_bytes"] + job["write"]["io_bytes"]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    seconds = job["job_runtime"] / 1000
    if seconds <= 0 or ios <= 0:
        raise FioOutputError("fio job moved no data")
    return Outcome(bytes_moved=moved, seconds=seconds, ios=ios)
