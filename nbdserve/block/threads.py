"""The bounded thread pool drivers use for system calls that may block on a disk.

Every driver shares one :class:`trio.CapacityLimiter` per trio run, so a slow disk can occupy
at most ``max_threads()`` worker threads however many requests are queued: the rest wait in
trio, where they cost nothing and stay cancellable until they start.

A call that has started in a thread is never abandoned on cancellation. A half-finished
``pwrite`` whose result nobody waits for would let a later request race with it; the caller
waits for the system call instead (they are bounded by the disk, not by a peer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

#: Default bound; enough to keep a fast NVMe queue busy on a small machine.
DEFAULT_MAX_THREADS = 16

_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("nbdserve-io-limiter")
_max_threads = DEFAULT_MAX_THREADS


def limiter() -> trio.CapacityLimiter:
    """The limiter of the current trio run (created on first use)."""
    try:
        return _limiter.get()
    except LookupError:
        lim = trio.CapacityLimiter(_max_threads)
        _limiter.set(lim)
        return lim


def max_threads() -> int:
    return _max_threads


def set_max_threads(count: int) -> None:
    """Change the bound for this and later trio runs."""
    global _max_threads
    if count < 1:
        raise ValueError(f"the I/O thread pool needs at least one thread, not {count}")
    _max_threads = count
    # No trio run active (RuntimeError), or no limiter made in it yet (LookupError).
    with contextlib.suppress(LookupError, RuntimeError):
        _limiter.get().total_tokens = count


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread of the shared pool and return its result."""
    result: T = await trio.to_thread.run_sync(fn, *args, limiter=limiter(), cancellable=False)
    return result
