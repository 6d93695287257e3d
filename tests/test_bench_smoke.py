"""The benchmark suite's pure parts: fio parsing, medians, ratios, rendering. No servers run."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from bench import procstat
from bench.__main__ import build_parser, main, parse_size
from bench.profile import summarise_stacks
from bench.render import chart, markdown
from bench.results import Sample, ratios, summarise, to_json
from bench.servers import SERVERS
from bench.workloads import ROWS, FioOutputError, fio_command, nbdcopy_command, parse_fio

SAMPLE = Path(__file__).resolve().parent.parent / "bench" / "samples" / "fio-randrw-qd16.txt"
ROW = {r.key: r for r in ROWS}
SERVER = {s.key: s for s in SERVERS}
PEERS = {s.key: s.peer for s in SERVERS if s.peer is not None}


def test_parse_fio_sample_sums_reads_and_writes() -> None:
    text = SAMPLE.read_text()
    assert text.startswith("fio: connected")  # the line the nbd engine prints before the JSON
    outcome = parse_fio(text)
    assert outcome.bytes_moved == 56512512 + 24080384
    assert outcome.ios == 13797 + 5879
    assert outcome.seconds == 1.0
    assert outcome.iops == pytest.approx(19676)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fio: engine nbd not loadable\n",
        "{ not json",
        '{"jobs": []}',
        '{"jobs": [{"error": 5, "read": {}, "write": {}}]}',
    ],
)
def test_parse_fio_rejects_bad_output(text: str) -> None:
    with pytest.raises(FioOutputError):
        parse_fio(text)


def test_fio_command_sets_size_runtime_and_mix() -> None:
    cmd = fio_command(ROW["randrw70-4k-qd16"], "nbd+unix:///?socket=/s", 2**30, 1.5)
    assert "--uri=nbd+unix:///?socket=/s" in cmd
    assert f"--size={2**30}" in cmd
    assert "--runtime=1500ms" in cmd
    assert "--rwmixread=70" in cmd
    assert "--iodepth=16" in cmd
    plain = fio_command(ROW["seqread-1m-qd8"], "u", 1, 1)
    assert not any(a.startswith("--rwmixread") for a in plain)


def test_nbdcopy_commands() -> None:
    assert nbdcopy_command(ROW["copy-to-null"], "U", Path("/f")) == ["nbdcopy", "U", "null:"]
    assert nbdcopy_command(ROW["copy-from-file"], "U", Path("/f"))[-2:] == ["/f", "U"]
    with pytest.raises(ValueError, match="not an nbdcopy row"):
        nbdcopy_command(ROW["seqread-1m-qd8"], "U", Path("/f"))


def _sample(server: str, mib: float, run: int = 1, cpu: float = 1.0, rss: int = 10) -> Sample:
    return Sample(
        row="seqread-1m-qd8",
        server=server,
        run=run,
        bytes_moved=int(mib * 2**20),
        seconds=1.0,
        ios=int(mib),
        cpu_seconds=cpu,
        peak_rss=rss * 2**20,
    )


def test_summarise_takes_medians_max_rss_and_counts_errors() -> None:
    samples = [
        _sample("nbdkit-file", 100, run=1, rss=5),
        _sample("nbdkit-file", 300, run=2, rss=9),
        _sample("nbdkit-file", 200, run=3, rss=7),
        Sample("seqread-1m-qd8", "nbdkit-file", 4, error="fio exited 1"),
        Sample("seqread-1m-qd8", "qemu-threads", 1, error="fio exited 1"),
    ]
    cells = summarise(samples)
    cell = cells["seqread-1m-qd8", "nbdkit-file"]
    assert cell.mib_per_s == pytest.approx(200)
    assert cell.runs == 3 and cell.errors == 1
    assert cell.peak_rss_mib == pytest.approx(9)
    assert cell.spread == pytest.approx(1.0)  # (300 - 100) / 200
    assert ("seqread-1m-qd8", "qemu-threads") not in cells  # no successful run, no figure


def test_ratios_count_qemu_once_in_its_faster_mode() -> None:
    cells = summarise(
        [
            _sample("nbdserve", 600, cpu=0.5),
            _sample("qemu-threads", 200),
            _sample("qemu-io_uring", 400, cpu=0.4),
            _sample("nbdkit-file", 300),
            _sample("nbdkit-python", 100),
        ]
    )
    (ratio,) = ratios(cells, ["seqread-1m-qd8"], ["nbdserve"], PEERS)
    assert ratio.per_peer == {
        "qemu-nbd": pytest.approx(1.5),
        "nbdkit file": pytest.approx(2.0),
        "nbdkit python": pytest.approx(6.0),
    }
    assert ratio.fastest_peer == "qemu-nbd"
    assert ratio.vs_fastest == pytest.approx(1.5)
    # CPU per GiB: 0.5 s / (600 MiB) against io_uring's 0.4 s / (400 MiB).
    assert ratio.cpu_vs_fastest == pytest.approx((0.5 / 600) / (0.4 / 400))


def test_ratios_without_peers_or_nbdserve() -> None:
    cells = summarise([_sample("nbdserve", 600)])
    (ratio,) = ratios(cells, ["seqread-1m-qd8"], ["nbdserve"], PEERS)
    assert ratio.fastest_peer is None and ratio.vs_fastest is None and ratio.per_peer == {}
    peers_only = summarise([_sample("nbdkit-file", 1)])
    assert ratios(peers_only, ["seqread-1m-qd8"], ["nbdserve"], PEERS) == []


META = {
    "date": "2026-01-01 00:00 UTC",
    "machine": "test",
    "size_human": "1 MiB",
    "image_dir": "/dev/shm",
    "runs": 1,
    "runtime": 1.0,
    "errors": [],
    "load_before": 0.1,
    "load_after": 1.5,
}


def test_markdown_shows_throughput_ratios_cpu_and_rss() -> None:
    samples = [_sample("nbdserve", 600, rss=42), _sample("nbdkit-file", 300)]
    cells = summarise(samples)
    servers = [SERVER["nbdserve"], SERVER["nbdkit-file"]]
    ratio_list = ratios(cells, ["seqread-1m-qd8"], ["nbdserve"], PEERS)
    text = markdown(META, [ROW["seqread-1m-qd8"]], servers, cells, ratio_list)
    assert "| 1M sequential read QD8 | 600 MiB/s | 300 MiB/s |" in text
    assert "| 1M sequential read QD8 | nbdserve | 2.00x | 2.00x (nbdkit file) |" in text
    assert "| 1M sequential read QD8 | 42 | 10 |" in text
    assert "0.10 → 1.50" in text
    assert to_json(META, samples, cells, ratio_list)["ratios"][0]["vs_fastest"] == 2.0


def test_markdown_lists_errors_one_per_line() -> None:
    meta = {**META, "errors": ["1M read, run 1, nbdserve: exited 1:\nTraceback\n  boom"]}
    text = markdown(meta, [ROW["seqread-1m-qd8"]], [SERVER["nbdserve"]], {}, [])
    assert "- 1M read, run 1, nbdserve: exited 1: / Traceback / boom\n" in text
    assert "| 1M sequential read QD8 | — |" in text


def test_markdown_shows_spread_when_there_are_several_runs() -> None:
    cells = summarise([_sample("nbdkit-file", 90, run=1), _sample("nbdkit-file", 110, run=2)])
    text = markdown(META, [ROW["seqread-1m-qd8"]], [SERVER["nbdkit-file"]], cells, [])
    assert "| 1M sequential read QD8 | 100 MiB/s ±10% |" in text


def test_markdown_small_io_rows_lead_with_iops() -> None:
    sample = Sample("randread-4k-qd16", "nbdkit-file", 1, 4096 * 50000, 1.0, 50000, 1.0, 1)
    cells = summarise([sample])
    text = markdown(META, [ROW["randread-4k-qd16"]], [SERVER["nbdkit-file"]], cells, [])
    assert "50.0k IOPS (195 MiB/s)" in text


def test_chart_writes_png_or_says_why_not(tmp_path: Path) -> None:
    cells = summarise([_sample("nbdserve", 600), _sample("nbdkit-file", 300)])
    ratio_list = ratios(cells, ["seqread-1m-qd8"], ["nbdserve"], PEERS)
    servers = [SERVER["nbdserve"], SERVER["nbdkit-file"]]
    png = tmp_path / "ratios.png"
    why = chart(png, [ROW["seqread-1m-qd8"]], servers, ratio_list)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert why is not None and "matplotlib" in why and not png.exists()
    else:
        assert why is None
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_without_matplotlib_is_skipped_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    why = chart(tmp_path / "r.png", list(ROWS), list(SERVERS), [])
    assert why is not None and "matplotlib" in why


@pytest.mark.parametrize(("text", "size"), [("1G", 2**30), ("256M", 2**28), ("64MiB", 2**26)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "1.5G", "12", "big", "-1G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(Exception, match="size"):
        parse_size(text)


def test_cli_rejects_unknown_server(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--servers", "nbdkit-file,bogus"])
    assert exit_info.value.code == 2
    assert "unknown server bogus" in capsys.readouterr().err


def test_procstat_reads_this_process() -> None:
    pid = os.getpid()
    before = procstat.cpu_seconds(pid)
    start = time.process_time()
    while time.process_time() - start < 0.1:
        pass
    assert procstat.cpu_seconds(pid) - before >= 0.05
    assert procstat.peak_rss_bytes(pid) > 1 << 20
    assert pid in procstat.process_tree(pid)


def test_profile_summary_self_and_inclusive_shares() -> None:
    collapsed = "\n".join(
        [
            "main (s.py:1);serve (s.py:5);parse (p.py:9) 30",
            "main (s.py:1);serve (s.py:5);send (t.py:2) 40",
            "main (s.py:1);serve (s.py:5);send (t.py:7) 20",
            "main (s.py:1);serve (s.py:5) 10",
            "garbage line",
        ]
    )
    text = summarise_stacks(collapsed)
    assert text.startswith("100 samples")
    assert "  60.0  send (t.py)" in text  # both lines of send count as one function
    assert " 100.0  serve (s.py)" in text  # inclusive: every sample passes through serve
    assert summarise_stacks("") == "no samples\n"


def test_report_can_be_rebuilt_from_saved_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = [_sample("nbdserve", 600), _sample("nbdkit-file", 300)]
    meta = {**META, "rows": ["seqread-1m-qd8"], "servers": ["nbdserve", "nbdkit-file"]}
    cells = summarise(samples)
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(to_json(meta, samples, cells, [])))
    assert main(["--report-from", str(saved), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| 1M sequential read QD8 | nbdserve | 2.00x | 2.00x (nbdkit file) |" in text
    assert main(["--report-from", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
