"""The worker-thread pool the ``file`` driver (and any other blocking driver) uses."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from nbdserve.block import threads


@pytest.fixture
def two_threads() -> Iterator[None]:
    old = threads.max_threads()
    threads.set_max_threads(2)
    try:
        yield
    finally:
        threads.set_max_threads(old)


async def test_results_and_errors_come_back() -> None:
    assert await threads.run_sync(sum, [1, 2, 3]) == 6
    main = threading.main_thread()
    assert await threads.run_sync(lambda: threading.current_thread() is main) is False
    with pytest.raises(OSError) as info:
        await threads.run_sync(os.fstat, -1)
    assert info.value.errno == errno.EBADF


async def test_at_most_max_threads_jobs_run_at_once(two_threads: None) -> None:
    lock = threading.Lock()
    state = {"now": 0, "max": 0}
    both_in = threading.Event()

    def work() -> None:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            if state["now"] == 2:
                both_in.set()
        both_in.wait(10)  # hold the slot until a second job runs alongside
        with lock:
            state["now"] -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(threads.run_sync, work)
    assert state["max"] == 2  # even though more threads may exist from earlier tests
    with pytest.raises(ValueError):
        threads.set_max_threads(0)


async def test_a_caller_waiting_for_a_slot_can_be_cancelled(two_threads: None) -> None:
    release = threading.Event()
    ran: list[object] = []

    def hold() -> None:
        release.wait(10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(threads.run_sync, hold)
        nursery.start_soon(threads.run_sync, hold)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01) as scope:  # both slots busy: this one waits in trio
            await threads.run_sync(ran.append, "third")
        assert scope.cancelled_caught and ran == []
        release.set()


async def test_a_submitted_job_is_waited_for_even_when_cancelled() -> None:
    started = threading.Event()
    finish = threading.Event()
    done = []

    def job() -> None:
        started.set()
        finish.wait(10)
        done.append(True)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_once_running() -> None:
                await trio.to_thread.run_sync(started.wait, 10)
                scope.cancel()
                finish.set()

            nursery.start_soon(cancel_once_running)
            await threads.run_sync(job)
    assert done == [True]  # the cancelled caller still waited for the system call


async def test_already_cancelled_caller_submits_nothing() -> None:
    ran: list[object] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await threads.run_sync(ran.append, 1)
    assert ran == [] and scope.cancelled_caught
