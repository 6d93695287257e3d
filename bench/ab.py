"""Old against new: one fio row, source trees (and nbdkit file) taking turns.

    python3 -m bench.ab ROW TREE [TREE ...] [--runs N] [--runtime S] [--image PATH]

ROW is ``rw:bs:iodepth`` as fio spells them (``randwrite:4k:16``, ``read:1m:8``); each TREE is
a checkout of nbdserve (``git worktree add /tmp/old HEAD~1``), or ``nbdkit`` for ``nbdkit
file``. Each run starts every server afresh on a Unix socket, in the same order, serving the
same page-cached raw image, and drives it for ``--runtime`` seconds; the report gives the
median IOPS and the median server CPU time per request, which moves less than throughput
when the machine is noisy. Alternating is what makes a small difference believable here: one
cell of one server spreads by ±10-30 % between runs on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def start(tree: str, image: Path, sock: Path) -> subprocess.Popen[bytes]:
    if tree == "nbdkit":
        argv = ["nbdkit", "-f", "-U", str(sock), "file", str(image)]
        proc = subprocess.Popen(argv)
    else:  # the tree's own sources first on the path: its nbdserve, its protocol
        argv = [sys.executable, "-c", "import sys; from nbdserve.cli import main; sys.exit(main())",
                "-t", "-e", "8", "-k", str(sock), "-f", "raw", str(image)]
        proc = subprocess.Popen(argv, cwd=tree, env=dict(os.environ, PYTHONPATH=tree),
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{tree}: the server did not start")
        time.sleep(0.02)
    return proc


def fio(row: str, sock: Path, size: int, runtime: float) -> tuple[int, float]:
    """Requests done and IOPS."""
    rw, bs, depth = row.split(":")
    out = subprocess.run(
        ["fio", "--name=ab", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
         f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={size}", "--time_based",
         f"--runtime={int(runtime * 1000)}ms", "--output-format=json",
         *(["--rwmixread=70"] if rw in ("randrw", "rw") else [])],
        capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    return ios, job["read"]["iops"] + job["write"]["iops"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("row")
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtime", type=float, default=3.0)
    parser.add_argument("--image", type=Path,
                        help="a page-cached raw image (default: 1 GiB of random bytes in /dev/shm)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        image = args.image
        if image is None:
            image = Path(tmp) / "ab.img"
            with open(image, "wb") as f:
                for _ in range(1024):
                    f.write(os.urandom(1 << 20))
        sock = Path(tmp) / "ab.sock"
        results: dict[str, list[tuple[float, float]]] = {t: [] for t in args.trees}
        for run in range(args.runs):
            for tree in args.trees:
                proc = start(tree, image, sock)
                try:
                    before = cpu_seconds(proc.pid)
                    ios, iops = fio(args.row, sock, image.stat().st_size, args.runtime)
                    used = cpu_seconds(proc.pid) - before
                finally:
                    proc.terminate()
                    proc.wait()
                    sock.unlink(missing_ok=True)
                results[tree].append((iops, used / max(ios, 1) * 1e6))
                print(f"[{run + 1}/{args.runs}] {tree:<24} {iops:>9,.0f} IOPS "
                      f"{results[tree][-1][1]:6.2f} µs CPU/request", flush=True)
    print(f"{args.row}, median of {args.runs}:")
    for tree, got in results.items():
        print(f"  {tree:<24} {statistics.median(g[0] for g in got):>9,.0f} IOPS "
              f"{statistics.median(g[1] for g in got):6.2f} µs CPU/request")


if __name__ == "__main__":
    main()
