"""``python3 -m bench``: serve one image with each server in turn and compare them."""

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .profile import ProfilerError, require_py_spy
from .render import chart, markdown
from .results import Sample, ratios, summarise, to_json
from .runner import Plan, describe_machine, run_all
from .servers import QCOW2_DEFAULT_ROWS, SERVERS, Server, comparison_groups
from .workloads import ROWS, Row

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 256M, 1G)")
    size = int(match[1]) * _UNITS[match[2].upper()]
    if size % 2**20:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a whole number of MiB")
    return size


def _subset(text: str, known: list[str], kind: str) -> list[str]:
    picked = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in picked if p not in known]
    if not picked:
        raise argparse.ArgumentTypeError(f"no {kind} named in {text!r}")
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return picked


def build_parser() -> argparse.ArgumentParser:
    row_keys = [r.key for r in ROWS]
    server_keys = [s.key for s in SERVERS]
    p = argparse.ArgumentParser(
        prog="python3 -m bench",
        description="Side-by-side NBD server benchmark: nbdserve, qemu-nbd and nbdkit.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="development mode: 256M image, 1 run, 1 s per cell, one server start per run",
    )
    p.add_argument("--size", type=parse_size, help="image size (default 1G; --quick 256M)")
    p.add_argument("--runs", type=int, help="runs per cell; each figure is the median (default 3)")
    p.add_argument("--runtime", type=float, help="seconds per fio cell (default 5; --quick 1)")
    p.add_argument(
        "--servers",
        type=lambda t: _subset(t, server_keys, "server"),
        default=server_keys,
        help=f"comma list from: {','.join(server_keys)}",
    )
    p.add_argument(
        "--rows",
        type=lambda t: _subset(t, row_keys, "row"),
        help=f"comma list from: {','.join(row_keys)} (default: all; the qcow2 servers run "
        f"only {','.join(QCOW2_DEFAULT_ROWS)} unless rows are named)",
    )
    p.add_argument(
        "--image-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="where the image lives; must be page-cached (default /dev/shm)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample every nbdserve cell with py-spy; collapsed stacks and summaries go to DIR",
    )
    p.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="run nothing: rebuild results.md and ratios.png in --out from a saved results.json",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).with_name("results"),
        help="output directory (default bench/results/)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report_from is not None:
        return rerender(args.report_from, args.out)
    size = args.size or (256 * 2**20 if args.quick else 2**30)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    runtime = args.runtime if args.runtime is not None else (1.0 if args.quick else 5.0)
    if runs < 1 or runtime <= 0:
        print("error: --runs must be >= 1 and --runtime > 0", file=sys.stderr)
        return 2
    if not args.image_dir.is_dir():
        print(f"error: --image-dir {args.image_dir} is not a directory", file=sys.stderr)
        return 2
    if args.profile is not None:
        try:
            require_py_spy()
        except ProfilerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        args.profile.mkdir(parents=True, exist_ok=True)
    plan = Plan(
        rows=[r for r in ROWS if args.rows is None or r.key in args.rows],
        servers=[s for s in SERVERS if s.key in args.servers],
        size=size,
        runs=runs,
        runtime=runtime,
        image_dir=args.image_dir,
        fresh_per_cell=not args.quick,
        rows_named=args.rows is not None,
        profile_dir=args.profile,
    )
    if plan.load_before > 0.5:
        print(f"note: load average is {plan.load_before:.2f}; other work will skew the figures")
    samples = run_all(plan, lambda line: print(line, flush=True))
    write_report(args.out, describe_machine(plan), plan.rows, plan.servers, samples)
    return 1 if plan.errors else 0


def write_report(
    out: Path,
    meta: dict[str, Any],
    rows: Sequence[Row],
    servers: Sequence[Server],
    samples: Sequence[Sample],
) -> None:
    cells = summarise(samples)
    ours = [s.key for s in servers if s.is_nbdserve]
    peers = {s.key: s.peer for s in servers if s.peer is not None}
    groups = comparison_groups(servers)
    ratio_list = ratios(cells, [r.key for r in rows], ours, peers, groups)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(meta, rows, servers, cells, ratio_list)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(
        json.dumps(to_json(meta, samples, cells, ratio_list), indent=2) + "\n"
    )
    skipped = chart(out / "ratios.png", rows, servers, ratio_list, meta.get("schedule"))
    print()
    print(report)
    print(f"wrote {out}/results.md, results.json" + ("" if skipped else ", ratios.png"))
    if skipped:
        print(skipped)


def rerender(saved: Path, out: Path) -> int:
    """Rebuild the report from a results.json: the samples are the data, the rest is derived."""
    try:
        data = json.loads(saved.read_text())
        meta = data["meta"]
        samples = [Sample(**s) for s in data["samples"]]
        rows = [r for r in ROWS if r.key in meta["rows"]]
        servers = [s for s in SERVERS if s.key in meta["servers"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: cannot read {saved}: {exc}", file=sys.stderr)
        return 2
    write_report(out, meta, rows, servers, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
