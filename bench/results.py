"""Samples, their medians, and the ratios of nbdserve to its peers. Pure: no I/O."""

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any

GIB = 2**30


@dataclass(frozen=True, slots=True)
class Sample:
    """One row run once against one server; ``error`` set means no figures."""

    row: str
    server: str
    run: int
    bytes_moved: int = 0
    seconds: float = 0.0
    ios: int | None = None
    cpu_seconds: float = 0.0
    peak_rss: int = 0
    error: str | None = None

    @property
    def mib_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 2**20

    @property
    def iops(self) -> float | None:
        return None if self.ios is None else self.ios / self.seconds

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu_seconds / (self.bytes_moved / GIB)


@dataclass(frozen=True, slots=True)
class Cell:
    """Median figures of one (row, server) over its successful runs; peak RSS is the maximum."""

    row: str
    server: str
    runs: int
    mib_per_s: float
    iops: float | None
    cpu_per_gib: float
    peak_rss_mib: float
    errors: int
    spread: float  # (max - min) / median of throughput over the runs: how noisy the cell was


def summarise(samples: Iterable[Sample]) -> dict[tuple[str, str], Cell]:
    grouped: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        grouped.setdefault((sample.row, sample.server), []).append(sample)
    cells: dict[tuple[str, str], Cell] = {}
    for (row, server), group in grouped.items():
        good = [s for s in group if s.error is None and s.seconds > 0 and s.bytes_moved > 0]
        if not good:
            continue
        iops = [s.iops for s in good if s.iops is not None]
        rates = [s.mib_per_s for s in good]
        cells[row, server] = Cell(
            row=row,
            server=server,
            runs=len(good),
            mib_per_s=median(rates),
            iops=median(iops) if iops else None,
            cpu_per_gib=median(s.cpu_per_gib for s in good),
            peak_rss_mib=max(s.peak_rss for s in good) / 2**20,
            errors=len(group) - len(good),
            spread=(max(rates) - min(rates)) / median(rates),
        )
    return cells


@dataclass(frozen=True, slots=True)
class PeerBest:
    """A peer's figure on one row: the best of its configurations (qemu-nbd's two aio modes)."""

    peer: str
    server: str
    cell: Cell


def best_per_peer(
    cells: dict[tuple[str, str], Cell], row: str, peers: dict[str, str]
) -> dict[str, PeerBest]:
    """*peers* maps server key -> peer name; returns peer name -> its fastest configuration."""
    best: dict[str, PeerBest] = {}
    for server, peer in peers.items():
        cell = cells.get((row, server))
        if cell is None:
            continue
        if peer not in best or cell.mib_per_s > best[peer].cell.mib_per_s:
            best[peer] = PeerBest(peer, server, cell)
    return best


@dataclass(frozen=True, slots=True)
class Ratio:
    """nbdserve configuration ÷ peer on one row; > 1 means nbdserve moved more data per second."""

    row: str
    server: str
    per_peer: dict[str, float]
    fastest_peer: str | None
    vs_fastest: float | None
    cpu_vs_fastest: float | None  # nbdserve CPU/GiB ÷ the fastest peer's; < 1 is better


def ratios(
    cells: dict[tuple[str, str], Cell],
    rows: Sequence[str],
    ours: Sequence[str],
    peers: dict[str, str],
    groups: dict[str, str] | None = None,
) -> list[Ratio]:
    """*groups* maps server key -> comparison group (the image format); a configuration is
    compared only with peers in its own group. Servers it does not name share one group."""
    group = groups or {}
    out: list[Ratio] = []
    for row in rows:
        for server in ours:
            cell = cells.get((row, server))
            if cell is None:
                continue
            mine = group.get(server, "")
            same = {k: p for k, p in peers.items() if group.get(k, "") == mine}
            best = best_per_peer(cells, row, same)
            fastest = max(best.values(), key=lambda b: b.cell.mib_per_s, default=None)
            out.append(
                Ratio(
                    row=row,
                    server=server,
                    per_peer={p: cell.mib_per_s / b.cell.mib_per_s for p, b in best.items()},
                    fastest_peer=fastest.peer if fastest else None,
                    vs_fastest=cell.mib_per_s / fastest.cell.mib_per_s if fastest else None,
                    cpu_vs_fastest=(
                        cell.cpu_per_gib / fastest.cell.cpu_per_gib
                        if fastest and fastest.cell.cpu_per_gib > 0
                        else None
                    ),
                )
            )
    return out


def to_json(
    meta: dict[str, Any], samples: Sequence[Sample], cells: dict[tuple[str, str], Cell],
    ratio_list: Sequence[Ratio],
) -> dict[str, Any]:  # fmt: skip
    return {
        "meta": meta,
        "samples": [asdict(s) for s in samples],
        "medians": [asdict(c) for c in cells.values()],
        "ratios": [asdict(r) for r in ratio_list],
    }
