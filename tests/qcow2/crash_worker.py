"""Subprocess for test_crash: writes unique blocks into a qcow2 image through the block
layer, 16 requests in flight, and after each completed flush prints the blocks whose
writes were acknowledged before that flush started. The test kills it with SIGKILL."""

from __future__ import annotations

import random
import struct
import sys

import trio

from nbdserve.block import Perm, ReqFlags, open_graph

BLOCK = 4096


def pattern(i: int) -> bytes:
    """What block ``i`` holds once written: every 11th block is zero-written instead."""
    if i % 11 == 0:
        return bytes(BLOCK)
    return struct.pack(">I", i + 1) * (BLOCK // 4)


async def main(path: str, seed: int) -> None:
    graph = await open_graph(
        [{"driver": "qcow2", "node-name": "d", "file": {"driver": "file", "filename": path}}]
    )
    child = graph.attach("d", perm=Perm.CONSISTENT_READ | Perm.WRITE, user="crash-worker")
    rng = random.Random(seed)
    blocks = list(range(child.size // BLOCK))
    rng.shuffle(blocks)
    acked: list[int] = []
    reported = 0

    async def writer() -> None:
        while blocks:
            i = blocks.pop()
            if i % 11 == 0:
                await child.zero(i * BLOCK, BLOCK, ReqFlags.MAY_UNMAP)
            elif i % 7 == 0:
                await child.write(i * BLOCK, pattern(i), ReqFlags.FUA)
            else:
                await child.write(i * BLOCK, pattern(i))
            acked.append(i)

    async def flusher() -> None:
        nonlocal reported
        while blocks:
            await trio.sleep(0.005)
            upto = len(acked)
            await child.flush()
            print("F", *acked[reported:upto], flush=True)
            reported = upto

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher)
        for _ in range(16):
            nursery.start_soon(writer)
    await graph.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
