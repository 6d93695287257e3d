"""Model-based random tests: a plain bytearray is the model. Each round runs a batch of
requests concurrently in a trio nursery -- writes, zero-writes, discards and reads at random
offsets, lengths and alignments, on byte ranges that are disjoint but often share an
alignment block (so unaligned writes race through read-modify-write) -- then compares the
whole disk with the model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from nbdserve.block import Child, Graph, Perm, ReqFlags

from .configs import CONFIGS, SIZE, Config, open_config

MODEL_CONFIGS = [c for c in CONFIGS if c.model]
ROUNDS = 25
BATCH = 8


def _pick_range(rng: random.Random, align: int) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.3:  # tiny, inside one block
        length = rng.randint(1, 64)
    elif kind < 0.8:
        length = rng.randint(1, 20_000)
    else:
        length = rng.randint(20_000, 300_000)
    if rng.random() < 0.3:
        # Start on, just before or just after an alignment / page boundary.
        grain = rng.choice([align, 4096, 65536])
        offset = rng.randrange(0, SIZE // grain) * grain + rng.choice([-1, 0, 1, 0])
    else:
        offset = rng.randrange(0, SIZE)
    offset = min(max(offset, 0), SIZE - 1)
    return offset, min(length, SIZE - offset)


async def _prefill_backing(graph: Graph, model: bytearray, rng: random.Random) -> None:
    if "base" not in graph.nodes:
        return
    base = graph.attach("base", perm=Perm.CONSISTENT_READ | Perm.WRITE, user="prefill")
    for _ in range(20):
        offset = rng.randrange(0, base.size - 1)
        length = min(rng.randint(1, 150_000), base.size - offset)
        data = rng.randbytes(length)
        await base.write(offset, data)
        model[offset : offset + length] = data
    base.detach()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=[c.name for c in MODEL_CONFIGS])
async def test_random_concurrent_requests(config: Config, seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    graph = await open_config(config, tmp_path)
    model = bytearray(SIZE)
    try:
        await _prefill_backing(graph, model, rng)
        child = graph.attach("top", perm=Perm.CONSISTENT_READ | Perm.WRITE, user="model test")
        align = child.limits.request_alignment
        for _ in range(ROUNDS):
            await _run_batch(child, model, rng, align)
            assert bytes(await child.read(0, SIZE)) == model
    finally:
        await graph.close()


async def _run_batch(child: Child, model: bytearray, rng: random.Random, align: int) -> None:
    taken: list[tuple[int, int]] = []
    discards: list[tuple[int, int]] = []
    errors: list[str] = []

    def free(offset: int, length: int) -> bool:
        return all(offset + length <= a or b <= offset for a, b in taken)

    async def write(offset: int, data: bytes, flags: ReqFlags) -> None:
        if not flags and rng.random() < 0.3 and child.write_nowait(offset, data):
            return
        await child.write(offset, data, flags)

    async def read(offset: int, length: int, expected: bytes) -> None:
        got = child.read_nowait(offset, length) if rng.random() < 0.3 else None
        if got is None:
            got = await child.read(offset, length)
        if bytes(got) != expected:
            errors.append(f"read {offset}+{length} differs from the model")

    async with trio.open_nursery() as nursery:
        for _ in range(BATCH):
            offset, length = _pick_range(rng, align)
            if not free(offset, length):
                continue
            taken.append((offset, offset + length))
            op = rng.random()
            if op < 0.45:
                data = rng.randbytes(length) if rng.random() < 0.9 else bytes(length)
                flags = ReqFlags.FUA if rng.random() < 0.2 else ReqFlags.NONE
                model[offset : offset + length] = data
                nursery.start_soon(write, offset, data, flags)
            elif op < 0.65:
                flags = rng.choice([ReqFlags.NONE, ReqFlags.MAY_UNMAP, ReqFlags.FUA])
                model[offset : offset + length] = bytes(length)
                nursery.start_soon(child.zero, offset, length, flags)
            elif op < 0.75:
                discards.append((offset, length))
                nursery.start_soon(child.discard, offset, length)
            else:
                nursery.start_soon(read, offset, length, bytes(model[offset : offset + length]))
    assert not errors, errors
    for offset, length in discards:
        # Discard is advisory: every byte reads as before or as zero; adopt what it reads.
        got = bytes(await child.read(offset, length))
        old = model[offset : offset + length]
        assert all(g in (o, 0) for g, o in zip(got, old, strict=True))
        model[offset : offset + length] = got
