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
from bench.runner import Plan, check_qcow2, make_qcow2
from bench.servers import QCOW2_DEFAULT_ROWS, SERVERS, Endpoint, comparison_groups
from bench.workloads import ROWS, FioOutputError, fio_command, nbdcopy_command, parse_fio

SAMPLE = Path(__file__).resolve().parent.parent / "bench" / "samples" / "fio-randrw-qd16.txt"
ROW = {r.key: r for r in ROWS}
SERVER = {s.key: s for s in SERVERS}
PEERS = {s.key: s.peer for s in SERVERS if s.peer is not None}
GROUPS = {s.key: s.image_format for s in SERVERS}


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
    # Every server, nbdserve's memory export included, advertises flush.
    assert nbdcopy_command(ROW["copy-from-file"], "U", Path("/f")) == [
        "nbdcopy", "--flush", "/f", "U"
    ]  # fmt: skip
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


def test_tcp_is_compared_with_tcp_when_the_run_has_a_tcp_peer() -> None:
    both = [SERVER[k] for k in ("nbdserve", "nbdserve-tcp", "nbdkit-file", "nbdkit-file-tcp")]
    groups = comparison_groups(both)
    assert groups == {"nbdserve": "raw", "nbdserve-tcp": "raw over TCP",
                      "nbdkit-file": "raw", "nbdkit-file-tcp": "raw over TCP"}
    cells = summarise([_sample("nbdserve", 600), _sample("nbdserve-tcp", 300),
                       _sample("nbdkit-file", 400), _sample("nbdkit-file-tcp", 200)])
    unix, tcp = ratios(cells, ["seqread-1m-qd8"], ["nbdserve", "nbdserve-tcp"], PEERS, groups)
    assert unix.vs_fastest == pytest.approx(1.5) and tcp.vs_fastest == pytest.approx(1.5)
    # Without a TCP peer in the run, TCP is compared with the peers on Unix sockets.
    assert comparison_groups(both[:3])["nbdserve-tcp"] == "raw"


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


UNIX = Endpoint(uri="nbd+unix:///?socket=/s.sock", unix_path=Path("/s.sock"))


def test_qcow2_servers_serve_the_qcow2_image_in_their_own_group() -> None:
    image = Path("/shm/image.qcow2")
    ours = SERVER["nbdserve-qcow2"]
    assert ours.is_nbdserve and ours.image_format == "qcow2"
    assert ours.argv(image, UNIX, 2**30)[-8:] == [
        "-t", "-e", "8", "-k", "/s.sock", "-f", "qcow2", "/shm/image.qcow2"
    ]  # fmt: skip
    for key, aio in [("qemu-qcow2", "threads"), ("qemu-qcow2-io_uring", "io_uring")]:
        qemu = SERVER[key]
        assert qemu.peer == "qemu-nbd" and qemu.image_format == "qcow2"
        argv = qemu.argv(image, UNIX, 2**30)
        assert argv[0] == "qemu-nbd" and argv[-1] == "/shm/image.qcow2"
        assert argv[argv.index("-f") + 1] == "qcow2"
        assert argv[argv.index("-k") + 1] == "/s.sock"
        assert {"--cache=writeback", f"--aio={aio}"} <= set(argv)
    # The raw servers are unchanged: still raw, still every row.
    assert SERVER["nbdserve"].argv(image, UNIX, 1)[-3:] == ["-f", "raw", "/shm/image.qcow2"]
    qemu_raw = SERVER["qemu-threads"].argv(image, UNIX, 1)
    assert qemu_raw[qemu_raw.index("-f") + 1] == "raw"
    raw = [s for s in SERVERS if s.image_format == "raw"]
    assert raw and all(s.default_rows is None for s in raw)
    assert set(QCOW2_DEFAULT_ROWS) <= set(ROW)


def test_qcow2_servers_run_their_default_rows_unless_rows_are_named() -> None:
    servers = [SERVER["nbdserve"], SERVER["nbdserve-qcow2"], SERVER["qemu-qcow2"]]
    versions = {"nbdserve": "test"}
    by_default = Plan(list(ROWS), servers, 2**20, 1, 1.0, Path("/tmp"), versions=versions)
    schedule = by_default.schedule()
    assert schedule["nbdserve"] == [r.key for r in ROWS]
    assert schedule["nbdserve-qcow2"] == schedule["qemu-qcow2"] == list(QCOW2_DEFAULT_ROWS)
    named = [ROW["randread-4k-qd1"], ROW["seqwrite-1m-qd8"]]
    chosen = Plan(named, servers, 2**20, 1, 1.0, Path("/tmp"), rows_named=True, versions=versions)
    assert chosen.schedule()["qemu-qcow2"] == ["randread-4k-qd1", "seqwrite-1m-qd8"]


def test_cli_leaves_rows_unnamed_by_default() -> None:
    assert build_parser().parse_args([]).rows is None
    assert build_parser().parse_args(["--rows", "randread-4k-qd1"]).rows == ["randread-4k-qd1"]


def test_rows_that_write() -> None:
    writing = {r.key for r in ROWS if r.writes}
    assert writing == {
        "randwrite-4k-qd16", "seqwrite-1m-qd8", "randrw70-4k-qd16", "copy-from-file"
    }  # fmt: skip


def _row_sample(row: str, server: str, mib: float, cpu: float = 1.0) -> Sample:
    return Sample(row, server, 1, int(mib * 2**20), 1.0, int(mib * 256), cpu, 2**20)


def test_qcow2_ratio_compares_only_with_qemu_nbd_on_qcow2() -> None:
    row = "randwrite-4k-qd16"
    cells = summarise(
        [
            _row_sample(row, "nbdserve", 100),
            _row_sample(row, "nbdkit-file", 400),  # fastest overall, but raw
            _row_sample(row, "qemu-io_uring", 50),
            _row_sample(row, "nbdserve-qcow2", 90, cpu=0.9),
            _row_sample(row, "qemu-qcow2", 60),
            _row_sample(row, "qemu-qcow2-io_uring", 120, cpu=2.0),  # faster mode counts
        ]
    )
    found = {r.server: r for r in ratios(cells, [row], ["nbdserve", "nbdserve-qcow2"], PEERS,
                                         GROUPS)}  # fmt: skip
    qcow2 = found["nbdserve-qcow2"]
    assert qcow2.per_peer == {"qemu-nbd": pytest.approx(0.75)}
    assert qcow2.fastest_peer == "qemu-nbd" and qcow2.vs_fastest == pytest.approx(0.75)
    assert qcow2.cpu_vs_fastest == pytest.approx((0.9 / 90) / (2.0 / 120))
    raw = found["nbdserve"]
    assert raw.per_peer == {"qemu-nbd": pytest.approx(2.0), "nbdkit file": pytest.approx(0.25)}
    assert raw.fastest_peer == "nbdkit file"


def test_markdown_gives_qcow2_its_own_tables_with_its_rows_only() -> None:
    rows = [ROW["randread-4k-qd1"], ROW["randread-4k-qd16"]]
    servers = [SERVER["nbdserve"], SERVER["nbdserve-qcow2"], SERVER["qemu-qcow2"]]
    samples = [
        _row_sample("randread-4k-qd1", "nbdserve", 40),
        _row_sample("randread-4k-qd16", "nbdserve", 100),
        _row_sample("randread-4k-qd16", "nbdserve-qcow2", 80),
    ]  # qemu-qcow2 failed every run: its cell shows a dash
    cells = summarise(samples)
    ratio_list = ratios(cells, [r.key for r in rows], ["nbdserve", "nbdserve-qcow2"], PEERS,
                        GROUPS)  # fmt: skip
    schedule = {
        "nbdserve": ["randread-4k-qd1", "randread-4k-qd16"],
        "nbdserve-qcow2": ["randread-4k-qd16"],
        "qemu-qcow2": ["randread-4k-qd16"],
    }
    text = markdown({**META, "schedule": schedule}, rows, servers, cells, ratio_list)
    assert "| Row | nbdserve |\n" in text
    assert "| 4K random read QD1 | 10.2k IOPS (40 MiB/s) |" in text
    assert "| Row | nbdserve qcow2 | qemu-nbd qcow2 threads |\n" in text
    assert "| 4K random read QD16 | 20.5k IOPS (80 MiB/s) | — |" in text
    assert "4K random read QD1 | 10.2k IOPS (40 MiB/s) | —" not in text  # no raw row padded
    assert text.count("| 4K random read QD1 |") == 4  # throughput, ratio, CPU, RSS: raw only
    assert text.count("On the qcow2 image (`qemu-img convert -O qcow2 -o cluster_size=64k`") == 1
    assert text.count("On the qcow2 image:") == 2  # CPU and RSS tables


def test_chart_draws_only_scheduled_cells(tmp_path: Path) -> None:
    cells = summarise([_row_sample("randread-4k-qd16", "nbdserve-qcow2", 80)])
    ratio_list = ratios(cells, ["randread-4k-qd16"], ["nbdserve-qcow2"], PEERS, GROUPS)
    rows = [ROW["randread-4k-qd1"], ROW["randread-4k-qd16"]]
    schedule = {"nbdserve-qcow2": ["randread-4k-qd16"]}
    png = tmp_path / "r.png"
    assert chart(png, rows, [SERVER["nbdserve-qcow2"]], ratio_list, schedule) is None
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_qemu_img_check_flags_a_damaged_qcow2(tmp_path: Path) -> None:
    raw, qcow2 = tmp_path / "a.raw", tmp_path / "a.qcow2"
    raw.write_bytes(os.urandom(2**20))
    make_qcow2(raw, qcow2)
    assert check_qcow2(qcow2) is None
    with qcow2.open("r+b") as f:  # data clusters now point past the end of the file
        f.truncate(qcow2.stat().st_size // 2)
    problem = check_qcow2(qcow2)
    assert problem is not None and "exited 2" in problem and "errors were found" in problem


def test_floor_server_reads_and_writes(tmp_path: Path) -> None:
    # bench/floor.py is the yardstick in bench/README.md: it must at least move the right
    # bytes, or its figures mean nothing. qemu-io writes a pattern and reads it back.
    import subprocess

    image = tmp_path / "floor.img"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "floor.sock"
    floor = Path(__file__).resolve().parent.parent / "bench" / "floor.py"
    server = subprocess.Popen([sys.executable, str(floor), str(image), str(sock), "--spin", "5"])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "floor.py did not start"
            time.sleep(0.02)
        uri = f"nbd+unix:///?socket={sock}"
        out = subprocess.run(
            ["qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 4096 65536",
             "-c", "read -P 0xab 4096 65536", "-c", "read -P 0 0 4096"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        assert "verification failed" not in out
        assert out.count("read 65536/65536 bytes") == 1
    finally:
        server.kill()
        server.wait()
    data = image.read_bytes()
    assert data[4096 : 4096 + 65536] == b"\xab" * 65536 and data[:4096] == bytes(4096)


async def test_hot_path_serves_every_request(tmp_path: Path) -> None:
    # bench/hot_path.py checks that each batch is parsed and answered at once before it
    # times anything; a tiny run must produce a figure for every row.
    from bench.hot_path import measure

    results = await measure(4, 1, str(tmp_path))  # a disk filesystem, unlike the default
    assert [name for name, _ in results] == [
        "READ parse", "WRITE parse", "READ parse + serve + reply", "WRITE parse + serve + reply"
    ]
    assert all(us > 0 for _, us in results)


def test_ab_alternates_a_tree_with_nbdkit(tmp_path: Path) -> None:
    # bench/ab.py is how bench/README.md compares old with new: a tiny run must serve the
    # image from the given tree and from nbdkit, and report both.
    import subprocess

    image = tmp_path / "ab.img"
    image.write_bytes(bytes(8 << 20))
    tree = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-m", "bench.ab", "randread:4k:4", tree, "nbdkit", "--runs", "2",
         "--runtime", "0.3", "--image", str(image)],
        capture_output=True, text=True, timeout=60, check=True, cwd=tree,
    ).stdout
    lines = out.splitlines()
    assert sum(line.startswith("[") for line in lines) == 4  # 2 runs x 2 servers
    summary = lines[lines.index("randread:4k:4, median of 2:") + 1:]
    assert [line.split()[0] for line in summary] == [tree, "nbdkit"]
    assert all(float(line.split()[1].replace(",", "")) > 0 for line in summary)
