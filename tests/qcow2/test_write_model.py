"""Seeded random workloads through the block layer against a bytearray model, many requests
in flight; afterwards ``qemu-img check`` finds no errors and no leaks, and ``qemu-img
compare`` finds the image identical to the model."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
import trio

from nbdserve.block import Child, Perm, ReqFlags, open_graph
from nbdserve.block.qcow2 import create_qcow2

from .helpers import check_image, open_image, qemu_img_create, qemu_io, raw_of, run

MiB = 1 << 20


class Workload:
    """Random requests on non-overlapping ranges (so the model is exact), ``tasks`` at a
    time; discarded ranges are read back into the model (their contents are undefined)."""

    def __init__(
        self, child: Child, model: bytearray, cs: int, seed: int, *, v3: bool = True
    ) -> None:
        self.child, self.model, self.cs, self.v3 = child, model, cs, v3
        self.rng = random.Random(seed)
        self.busy: list[tuple[int, int]] = []
        self.counts: dict[str, int] = {}

    async def _pick(self) -> tuple[int, int]:
        size = len(self.model)
        for attempt in range(1_000_000):
            if attempt % 20 == 19:
                await trio.sleep(0)  # everything nearby is busy: let others finish
            rng = self.rng
            if rng.random() < 0.5:  # cluster-aligned, so zero-writes hit the fast path
                off = rng.randrange(0, size, self.cs)
                n = min(size - off, self.cs * rng.randrange(1, 5))
            else:
                off = rng.randrange(size)
                n = rng.randrange(1, min(size - off, 3 * self.cs) + 1)
            if all(off + n <= s or s + m <= off for s, m in self.busy):
                return off, n
        raise AssertionError("no free range")

    async def one(self) -> None:
        off, n = await self._pick()
        span = (off, n)
        self.busy.append(span)
        try:
            await self._op(off, n)
        finally:
            self.busy.remove(span)

    async def _op(self, off: int, n: int) -> None:
        rng, child, model = self.rng, self.child, self.model
        k = rng.random()
        if k < 0.45:
            data = rng.randbytes(n) if rng.random() < 0.3 else bytes([rng.randrange(1, 256)]) * n
            model[off : off + n] = data
            op = "write"
            await child.write(off, data, ReqFlags.FUA if rng.random() < 0.05 else ReqFlags.NONE)
        elif k < 0.65:
            flags = rng.choice([ReqFlags.NONE, ReqFlags.MAY_UNMAP])
            if rng.random() < 0.3:
                flags |= ReqFlags.NO_FALLBACK
            op = f"zero-{flags!r}"
            try:
                await child.zero(off, n, flags)
            except OSError as exc:
                assert exc.errno == errno.ENOTSUP and flags & ReqFlags.NO_FALLBACK
                aligned = not (off | n) % self.cs or off + n == len(model)
                assert not (aligned and self.v3), "aligned fast zero failed on a v3 image"
                op = "zero-refused"
            else:
                model[off : off + n] = bytes(n)
        elif k < 0.75:
            op = "discard"
            await child.discard(off, n)
            model[off : off + n] = await child.read(off, n)
        elif k < 0.8:
            op = "flush"
            await child.flush()
        else:
            op = "read"
            assert bytes(await child.read(off, n)) == bytes(model[off : off + n]), (off, n)
        self.counts[op] = self.counts.get(op, 0) + 1

    async def run(self, ops: int, tasks: int) -> None:
        remaining = [ops]

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                await self.one()

        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)


async def _finish(img: Path, child: Child, model: bytearray, tmp: Path, graph: object) -> None:
    assert bytes(await child.read(0, len(model))) == bytes(model)
    await graph.close()  # type: ignore[attr-defined]
    info = check_image(img)
    assert info["returncode"] == 0, info
    assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0, info
    ref = tmp / "model.raw"
    ref.write_bytes(bytes(model))
    res = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("cs", "size", "compat"),
    [(512, 3 * MiB, "1.1"), (4096, 8 * MiB, "1.1"), (65536, 16 * MiB, "1.1"),
     (2 * MiB, 16 * MiB, "1.1"), (65536, 8 * MiB + 4321, "1.1"), (4096, 8 * MiB, "0.10")],
)
async def test_random_workload(tmp_path: Path, cs: int, size: int, compat: str) -> None:
    img = tmp_path / "w.qcow2"
    await create_qcow2(img, size, cluster_size=cs, compat=compat)
    graph, child = await open_image(img, writable=True)
    assert child.size == -(-size // 512) * 512
    model = bytearray(child.size)
    wl = Workload(child, model, cs, seed=cs + size, v3=compat == "1.1")
    await wl.run(ops=400, tasks=16)
    assert wl.counts.get("write", 0) > 50 and wl.counts.get("discard", 0) > 10
    await _finish(img, child, model, tmp_path, graph)


async def test_random_workload_over_backing_chain(tmp_path: Path) -> None:
    """Copy-on-write from a two-layer backing chain made by qemu, including compressed
    clusters in the image itself."""
    base = qemu_img_create(tmp_path / "base.qcow2", 6 * MiB, "cluster_size=4096")
    qemu_io(base, "write -P 0x11 0 6M", "write -z 2M 1M")
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    mid = tmp_path / "mid.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-B", base.name, "-F", "qcow2", src, mid,
        )
    img = qemu_img_create(tmp_path / "top.qcow2", 8 * MiB, "cluster_size=16384", backing=mid)
    qemu_io(img, "write -P 0x22 1M 100k")
    model = bytearray(raw_of(img, tmp_path))
    graph, child = await open_image(img, writable=True)
    wl = Workload(child, model, 16384, seed=99)
    await wl.run(ops=400, tasks=16)
    await _finish(img, child, model, tmp_path, graph)
    # the backing files were never written
    assert check_image(mid)["returncode"] == 0


async def test_rewrite_compressed_and_zero_clusters(tmp_path: Path) -> None:
    """Writing into compressed clusters frees them (no leak); the image shrinks back to
    normal clusters."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(bytes([i]) * 65536 for i in range(64)))
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", src, img)
    model = bytearray(src.read_bytes())
    graph, child = await open_image(img, writable=True)
    for i in range(0, 64, 3):
        await child.write(i * 65536 + 100, b"\xff" * 10)
        model[i * 65536 + 100 : i * 65536 + 110] = b"\xff" * 10
    await child.zero(65536, 65536, ReqFlags.MAY_UNMAP)
    model[65536 : 2 * 65536] = bytes(65536)
    await _finish(img, child, model, tmp_path, graph)


async def test_same_new_cluster_written_concurrently(tmp_path: Path) -> None:
    """Many writes into one unallocated cluster at once: allocated once, nothing lost."""
    img = tmp_path / "s.qcow2"
    await create_qcow2(img, 4 * MiB)
    graph, child = await open_image(img, writable=True)
    model = bytearray(4 * MiB)
    async with trio.open_nursery() as nursery:
        for i in range(64):
            data = bytes([i + 1]) * 512
            model[65536 + i * 1024 : 65536 + i * 1024 + 512] = data
            nursery.start_soon(child.write, 65536 + i * 1024, data)
    await _finish(img, child, model, tmp_path, graph)
    assert check_image(img)["allocated-clusters"] == 1


async def test_truncate_grows_l1(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    await create_qcow2(img, 1 * MiB, cluster_size=512)  # one L2 table covers 32 KiB
    graph, child = await open_image(img, writable=True)
    await child.write(1000, b"a" * 5000)
    await child.truncate(16 * MiB)
    assert child.size == 16 * MiB
    await child.write(16 * MiB - 700, b"b" * 700)
    model = bytearray(16 * MiB)
    model[1000:6000] = b"a" * 5000
    model[-700:] = b"b" * 700
    with pytest.raises(OSError) as info:
        await child.truncate(MiB)
    assert info.value.errno == errno.ENOTSUP
    await _finish(img, child, model, tmp_path, graph)
    out = run("qemu-img", "info", "--output=json", img).stdout
    assert '"virtual-size": 16777216' in out


async def test_internal_snapshot_left_intact(tmp_path: Path) -> None:
    """Clusters and L2 tables shared with an internal snapshot are copied, never written in
    place: the snapshot still reads its old contents and refcounts stay exact."""
    img = qemu_img_create(tmp_path / "snap.qcow2", 8 * MiB)
    qemu_io(img, "write -P 1 0 8M")
    run("qemu-img", "snapshot", "-c", "s1", img)
    model = bytearray(b"\x01" * (8 * MiB))
    graph, child = await open_image(img, writable=True)
    wl = Workload(child, model, 65536, seed=5)
    await wl.run(ops=200, tasks=8)
    await _finish(img, child, model, tmp_path, graph)
    run("qemu-img", "snapshot", "-a", "s1", img)
    assert raw_of(img, tmp_path) == b"\x01" * (8 * MiB)
    assert check_image(img)["returncode"] == 0


async def test_tiny_l2_cache(tmp_path: Path) -> None:
    """With room for a single L2 table (512-byte clusters: 96 tables in use), tables are
    evicted and reloaded all the time under 16 concurrent requests; nothing is lost."""
    img = tmp_path / "tiny.qcow2"
    await create_qcow2(img, 3 * MiB, cluster_size=512)
    graph, child = await open_image(img, writable=True, extra={"l2-cache-size": 512})
    assert graph.node("img").driver.l2cache.capacity == 1  # type: ignore[attr-defined]
    model = bytearray(3 * MiB)
    wl = Workload(child, model, 512, seed=11)
    await wl.run(ops=600, tasks=16)
    await _finish(img, child, model, tmp_path, graph)


async def test_backing_given_as_node_name(tmp_path: Path) -> None:
    """A ``backing`` option naming an existing node replaces the header's backing file."""
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x09" * (2 * MiB))
    img = qemu_img_create(tmp_path / "top.qcow2", 2 * MiB)  # no backing in the header
    graph = await open_graph([
        {"driver": "raw", "node-name": "base", "read-only": True,
         "file": {"driver": "file", "filename": str(other)}},
        {"driver": "qcow2", "node-name": "img", "backing": "base",
         "file": {"driver": "file", "filename": str(img)}},
    ])
    try:
        child = graph.attach("img", perm=Perm.CONSISTENT_READ | Perm.WRITE, user="test")
        await child.write(4096, b"\x01" * 100)
        data = bytes(await child.read(0, 2 * MiB))
        assert data[:4096] == b"\x09" * 4096 and data[4096:4196] == b"\x01" * 100
        assert data[4196:] == b"\x09" * (2 * MiB - 4196)  # copy-on-write kept the rest
        depths = [(e.length, e.depth) for e in await child.allocation_depth(0, 2 * MiB)]
        assert depths == [(65536, 1), (2 * MiB - 65536, 2)]  # the whole cluster was copied
    finally:
        await graph.close()
    assert other.read_bytes() == b"\x09" * (2 * MiB)
