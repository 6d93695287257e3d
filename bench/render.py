"""The report: a markdown table set and an optional PNG chart of the ratios."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .results import Cell, Ratio
from .servers import Server
from .workloads import Row


def _rate(cell: Cell | None, row: Row) -> str:
    if cell is None:
        return "—"
    mib = f"{cell.mib_per_s:,.0f} MiB/s"
    noise = f" ±{50 * cell.spread:.0f}%" if cell.runs > 1 else ""
    if row.small_io and cell.iops is not None:
        return f"{cell.iops / 1000:,.1f}k IOPS ({mib}){noise}"
    return mib + noise


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _groups(servers: Sequence[Server]) -> list[tuple[str, list[Server]]]:
    """Servers by image format, in their order: each group gets its own tables."""
    grouped: dict[str, list[Server]] = {}
    for server in servers:
        grouped.setdefault(server.image_format, []).append(server)
    return list(grouped.items())


def _scheduled(meta: dict[str, Any], row: Row, server: Server) -> bool:
    # Reports saved before the schedule was recorded ran every row on every server.
    schedule: dict[str, list[str]] | None = meta.get("schedule")
    return schedule is None or row.key in schedule.get(server.key, [])


def _group_note(meta: dict[str, Any], fmt: str, detail: bool) -> str:
    if fmt == "qcow2" and detail:
        options = meta.get("qcow2_options", "cluster_size=64k")
        return (
            f"On the qcow2 image (`qemu-img convert -O qcow2 -o {options}` of the raw image, "
            "every cluster allocated; a server start that runs a write row gets a fresh copy):"
        )
    return f"On the {fmt} image:"


def _per_group(
    meta: dict[str, Any],
    rows: Sequence[Row],
    servers: Sequence[Server],
    figure: Callable[[Row, Server], str],
    detail: bool = False,
) -> list[str]:
    """One table per image format, holding only the rows some server of that group ran.

    *detail* says how a non-raw image was made (once per report is enough)."""
    groups = _groups(servers)
    out: list[str] = []
    for fmt, group in groups:
        shown = [r for r in rows if any(_scheduled(meta, r, s) for s in group)]
        if not shown:
            continue
        if out:
            out.append("")
        if len(groups) > 1 or fmt != "raw":
            out += [_group_note(meta, fmt, detail), ""]
        out += _table(
            ["Row", *(s.label for s in group)],
            [[r.title, *(figure(r, s) for s in group)] for r in shown],
        )
    return out


def markdown(
    meta: dict[str, Any],
    rows: Sequence[Row],
    servers: Sequence[Server],
    cells: dict[tuple[str, str], Cell],
    ratio_list: Sequence[Ratio],
) -> str:
    peers = sorted({s.peer for s in servers if s.peer is not None})
    title = {r.key: r.title for r in rows}
    label = {s.key: s.label for s in servers}

    def cell(r: Row, s: Server) -> Cell | None:
        return cells.get((r.key, s.key))

    out = [
        "# nbdserve side-by-side benchmark",
        "",
        f"{meta['date']} · {meta['machine']} · image {meta['size_human']} in {meta['image_dir']}"
        f" · median of {meta['runs']} run(s), fio {meta['runtime']} s per cell",
        "",
        f"Load average (1 min) before and after: {meta['load_before']:.2f} → "
        f"{meta['load_after']:.2f}; other work on the machine skews the figures.",
        "",
        *(
            ["**Profiled**: py-spy sampled every nbdserve cell, which costs it some CPU.", ""]
            if meta.get("profiled")
            else []
        ),
        "## Throughput",
        "",
        "Median over the runs; ±N% is half the spread (max - min) relative to the median.",
        "",
        *_per_group(meta, rows, servers, lambda r, s: _rate(cell(r, s), r), detail=True),
        "",
        "## nbdserve ÷ peer (throughput; above 1.00x nbdserve is faster)",
        "",
        "qemu-nbd counts once, in its faster aio mode on that row. A configuration is compared "
        "only with peers serving the same image format: nbdserve on qcow2 with qemu-nbd on "
        "qcow2; and nbdserve over TCP only with peers over TCP when the run has one. The last "
        "column is nbdserve's server CPU per GiB divided by the fastest peer's (below 1.00x "
        "nbdserve uses less).",
        "",
        *_table(
            ["Row", "nbdserve as", *(f"÷ {p}" for p in peers), "÷ fastest peer", "CPU/GiB ÷"],
            [
                [
                    title[r.row],
                    label[r.server],
                    *(_x(r.per_peer.get(p)) for p in peers),
                    f"{_x(r.vs_fastest)} ({r.fastest_peer})" if r.fastest_peer else "—",
                    _x(r.cpu_vs_fastest),
                ]
                for r in ratio_list
            ],
        ),
        "",
        "## Server CPU seconds per GiB moved",
        "",
        *_per_group(meta, rows, servers, lambda r, s: _fmt(cell(r, s), "cpu")),
        "",
        "## Server peak RSS (MiB, maximum over runs)",
        "",
        *_per_group(meta, rows, servers, lambda r, s: _fmt(cell(r, s), "rss")),
    ]
    failures = [c for c in cells.values() if c.errors]
    if meta.get("errors"):
        out += ["", "## Errors", ""]
        out += ["- " + " / ".join(x.strip() for x in e.splitlines()) for e in meta["errors"]]
    elif failures:
        out += ["", f"{len(failures)} cell(s) had failed runs; see results.json."]
    return "\n".join(out) + "\n"


def _fmt(cell: Cell | None, what: str) -> str:
    if cell is None:
        return "—"
    if what == "cpu":
        return f"{cell.cpu_per_gib:.2f}"
    return f"{cell.peak_rss_mib:,.0f}"


def chart(
    path: Path,
    rows: Sequence[Row],
    servers: Sequence[Server],
    ratio_list: Sequence[Ratio],
    schedule: dict[str, list[str]] | None = None,
) -> str | None:
    """Write a bar chart of nbdserve ÷ fastest peer per row; returns why not if impossible.

    *schedule* (server key -> rows it ran) leaves out bars for cells that were never run, so
    only a run that failed is drawn as "n/a".
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): skipped ratios.png"
    ours = [s for s in servers if s.is_nbdserve]
    shown = [r for r in rows if any(x.row == r.key for x in ratio_list)]
    if not ours or not shown:
        return "no nbdserve results to chart: skipped ratios.png"
    lookup = {(r.row, r.server): r for r in ratio_list}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(shown)), 4.5))
    width = 0.8 / len(ours)
    for i, server in enumerate(ours):
        slots = [
            j
            for j, r in enumerate(shown)
            if schedule is None or r.key in schedule.get(server.key, [])
        ]
        found = [lookup.get((shown[j].key, server.key)) for j in slots]
        values = [x.vs_fastest if x and x.vs_fastest is not None else 0.0 for x in found]
        xs = [j + (i - (len(ours) - 1) / 2) * width for j in slots]
        bars = ax.bar(xs, values, width, label=server.label)
        # A missing figure (failed cell) is labelled, so it does not read as "zero speed".
        labels = [
            f"{v:.2f}" if x and x.vs_fastest is not None else "n/a"
            for x, v in zip(found, values, strict=True)
        ]
        ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.margins(y=0.12)  # room above the tallest bar for its label
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([r.title for r in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("throughput ÷ fastest peer")
    ax.set_title("nbdserve ÷ fastest peer serving the same image format", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
