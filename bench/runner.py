"""One benchmark run: prepare the image, serve it with each server in turn, drive each row."""

import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import procstat, profile
from .results import Sample
from .servers import Endpoint, Server, ServerStartError, running
from .workloads import FioOutputError, Outcome, Row, fio_command, nbdcopy_command, parse_fio

CHUNK = 16 * 2**20


@dataclass
class Plan:
    rows: Sequence[Row]
    servers: Sequence[Server]
    size: int
    runs: int
    runtime: float
    image_dir: Path
    errors: list[str] = field(default_factory=list)
    fresh_per_cell: bool = True
    rows_named: bool = False  # --rows given: every server runs every row, default_rows ignored
    profile_dir: Path | None = None  # py-spy every nbdserve cell into this directory
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    # Taken when the plan is made: the tree may change while a long run goes on.
    started: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    versions: dict[str, str] = field(default_factory=lambda: tool_versions())

    def rows_for(self, server: Server) -> list[Row]:
        return [r for r in self.rows if server.runs_row(r.key, self.rows_named)]

    def schedule(self) -> dict[str, list[str]]:
        """Server key -> the row keys it runs: which cells of the report are expected."""
        return {s.key: [r.key for r in self.rows_for(s)] for s in self.servers}


QCOW2_OPTIONS = "cluster_size=64k"


def make_qcow2(raw: Path, target: Path) -> None:
    """Convert the random raw image: every cluster allocated, the same bytes the raw servers see."""
    _client(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", QCOW2_OPTIONS, str(raw),
         str(target)],
        timeout=600,
    )  # fmt: skip


def check_qcow2(image: Path) -> str | None:
    """``qemu-img check``: None if the image is consistent, else what it reported."""
    done = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(image)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode == 0:
        return None
    # The summary ("37 errors were found") is on stdout, the first finding on stderr.
    lines = done.stdout.strip().splitlines()[:1] + done.stderr.strip().splitlines()[:1]
    return f"qemu-img check exited {done.returncode}: " + " / ".join(lines)


def fill_random(path: Path, size: int) -> None:
    """Write *size* random bytes: incompressible, no zero blocks for a server to skip."""
    with path.open("wb") as out:
        left = size
        while left:
            n = min(CHUNK, left)
            out.write(os.urandom(n))
            left -= n


def _client(argv: list[str], timeout: float) -> tuple[str, float]:
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {' / '.join(tail)}")
    return done.stdout, elapsed


def _drive(row: Row, ep: Endpoint, plan: Plan, source: Path) -> Outcome:
    # Generous: a client that hangs is an error, not a stall of the whole suite.
    timeout = plan.runtime + 60 + plan.size / 2**20 / 20
    if row.copy:
        _, elapsed = _client(nbdcopy_command(row, ep.uri, source), timeout)
        return Outcome(bytes_moved=plan.size, seconds=elapsed, ios=None)
    out, _ = _client(fio_command(row, ep.uri, plan.size, plan.runtime), timeout)
    return parse_fio(out)


def measure(row: Row, server: Server, run: int, pid: int, ep: Endpoint, plan: Plan,
            source: Path) -> Sample:  # fmt: skip
    procstat.reset_peak_rss(pid)
    cpu_before = procstat.cpu_seconds(pid)
    try:
        if plan.profile_dir is not None and server.is_nbdserve:
            stacks = plan.profile_dir / f"{row.key}.{server.key}.run{run}.txt"
            with profile.sampling(pid, stacks):
                outcome = _drive(row, ep, plan, source)
            if stacks.exists():
                summary = profile.summarise_stacks(stacks.read_text())
                stacks.with_suffix(".top.txt").write_text(summary)
        else:
            outcome = _drive(row, ep, plan, source)
    except (RuntimeError, FioOutputError, subprocess.TimeoutExpired) as exc:
        return Sample(row.key, server.key, run, error=str(exc))
    return Sample(
        row=row.key,
        server=server.key,
        run=run,
        bytes_moved=outcome.bytes_moved,
        seconds=outcome.seconds,
        ios=outcome.ios,
        cpu_seconds=procstat.cpu_seconds(pid) - cpu_before,
        peak_rss=procstat.peak_rss_bytes(pid),
    )


def run_all(plan: Plan, progress: Callable[[str], None]) -> list[Sample]:
    """Servers alternate (A B C A B C …) on the same image, each freshly started.

    With ``plan.fresh_per_cell`` every (row, run, server) gets its own server, so one row's
    memory high-water mark or leftover state never reaches the next row's figures, and the
    alternation is per row. Otherwise (``--quick``) each server is started once per run and
    serves every row in turn: starting a Python server costs about a second.

    qcow2 servers serve ``image.qcow2``, converted once from the raw image; sessions that
    write get a fresh copy of it, and every qcow2 session ends with ``qemu-img check``.
    """
    workdir = Path(tempfile.mkdtemp(prefix="nbdserve-bench-", dir=plan.image_dir))
    samples: list[Sample] = []
    broken: set[str] = set()
    try:
        image, source = workdir / "image.raw", workdir / "source.raw"
        progress(f"writing {plan.size / 2**20:.0f} MiB random image in {workdir}")
        fill_random(image, plan.size)
        if any(r.copy == "from-file" for r in plan.rows) or any(s.in_memory for s in plan.servers):
            shutil.copyfile(image, source)
        # Converted before any write row touches image.raw, so both groups start from one content.
        qcow2 = workdir / "image.qcow2"
        qcow2_servers = [s for s in plan.servers if s.image_format == "qcow2"]
        if qcow2_servers:
            progress(f"converting it to qcow2 ({QCOW2_OPTIONS})")
            try:
                make_qcow2(image, qcow2)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                broken.update(s.key for s in qcow2_servers)
                plan.errors.append(f"qcow2 image: {exc}")
                progress(f"ERROR {plan.errors[-1]} (skipping the qcow2 servers)")
        images = {"raw": image, "qcow2": qcow2}
        batches = (
            [([row], run) for row in plan.rows for run in range(1, plan.runs + 1)]
            if plan.fresh_per_cell
            else [(list(plan.rows), run) for run in range(1, plan.runs + 1)]
        )
        for rows, run in batches:
            for server in plan.servers:
                mine = [r for r in rows if server.runs_row(r.key, plan.rows_named)]
                if server.key in broken or not mine:
                    continue
                try:
                    served = _prepare(server, mine, images, workdir)
                    _session(server, mine, run, served, source, workdir, plan, progress, samples)
                    if server.image_format == "qcow2":
                        _check(served, server, mine, run, plan, progress)
                except (ServerStartError, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                    broken.add(server.key)
                    plan.errors.append(f"run {run}, {server.label}: {exc}")
                    progress(f"ERROR {plan.errors[-1]} (skipping {server.label} from now on)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return samples


def _prepare(server: Server, rows: Sequence[Row], images: dict[str, Path], workdir: Path) -> Path:
    """The image *server* serves: a qcow2 session that writes gets a fresh copy of the converted
    image, so every write cell starts from the same allocation state and metadata layout."""
    image = images[server.image_format]
    if server.image_format != "qcow2" or not any(r.writes for r in rows):
        return image
    scratch = workdir / "scratch.qcow2"
    shutil.copyfile(image, scratch)
    return scratch


def _check(image: Path, server: Server, rows: Sequence[Row], run: int, plan: Plan,
           progress: Callable[[str], None]) -> None:  # fmt: skip
    """A server that leaves a corrupt qcow2 behind has not earned its figures: say so."""
    problem = check_qcow2(image)
    if problem is not None:
        what = ", ".join(r.title for r in rows)
        plan.errors.append(f"run {run}, {server.label}: image after {what}: {problem}")
        progress(f"ERROR {plan.errors[-1]}")


def _session(server: Server, rows: Sequence[Row], run: int, image: Path, source: Path,
             workdir: Path, plan: Plan, progress: Callable[[str], None],
             samples: list[Sample]) -> None:  # fmt: skip
    """Start *server*, measure *rows* in order into *samples*, stop it.

    Raises if the server will not start or dies; what it measured before stays in *samples*.
    """
    with running(server, image, plan.size, workdir) as (proc, ep):
        if server.in_memory:
            _client(["nbdcopy", str(source), ep.uri], timeout=300)
        for row in rows:
            sample = measure(row, server, run, proc.pid, ep, plan, source)
            if proc.poll() is not None:
                raise ServerStartError(f"died during {row.title} (status {proc.returncode})")
            progress(_describe(sample, server, row, run, plan.runs))
            samples.append(sample)


def _describe(s: Sample, server: Server, row: Row, run: int, runs: int) -> str:
    where = f"[{run}/{runs}] {server.label:<24} {row.title:<32}"
    if s.error:
        return f"{where} ERROR {s.error}"
    rate = f"{s.iops:>9,.0f} IOPS" if row.small_io and s.iops else f"{s.mib_per_s:>9,.0f} MiB/s"
    return f"{where} {rate}  cpu {s.cpu_per_gib:5.2f} s/GiB  rss {s.peak_rss / 2**20:6.0f} MiB"


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "absent"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def tool_versions() -> dict[str, str]:
    repo = Path(__file__).resolve().parent.parent
    return {
        "nbdserve": _version(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "qemu-nbd": _version(["qemu-nbd", "--version"]),
        "nbdkit": _version(["nbdkit", "--version"]),
        "fio": _version(["fio", "--version"]),
        "nbdcopy": _version(["nbdcopy", "--version"]),
        "python": platform.python_version(),
    }


def describe_machine(plan: Plan) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": plan.started,
        "machine": f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}",
        "size": plan.size,
        "size_human": f"{plan.size / 2**20:.0f} MiB",
        "image_dir": str(plan.image_dir),
        "runs": plan.runs,
        "runtime": plan.runtime,
        "rows": [r.key for r in plan.rows],
        "servers": [s.key for s in plan.servers],
        "schedule": plan.schedule(),
        "qcow2_options": QCOW2_OPTIONS,
        "versions": plan.versions,
        "fresh_per_cell": plan.fresh_per_cell,
        "profiled": plan.profile_dir is not None,
        "errors": plan.errors,
        "load_before": plan.load_before,
        "load_after": os.getloadavg()[0],
    }
