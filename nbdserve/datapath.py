"""The transmission loop of a plain-socket connection, on an OS thread of its own.

Why a thread: a trio loop pays for every batch of requests with a scheduler pass, an epoll
re-arm and a wait; a thread that blocks in ``recv`` pays only the system call. On this 2-core
machine a minimal NBD loop served 4K reads at QD16 at 106k IOPS in trio and 150k on a thread
(``bench/floor.py``; bench/README.md, "Speed work, second sitting"). The handshake, TLS, and
every request that must wait (a page-cache miss, FLUSH, TRIM, BLOCK_STATUS, ...) stay in
trio; the thread serves what the block layer completes at once and hands the rest over.

Why it is safe: the block graph, the protocol objects and the connection's counters are only
ever touched by one thread at a time, under the :class:`GraphLock`. The trio thread holds it
whenever it runs tasks and lets go only while it waits for I/O, so a data-path thread's work
is atomic with respect to every trio task, exactly as a task's work between two awaits is.
The lock is never held across a blocking socket call. One exception inside a pass: a large
WRITE lets the lock go for its copy into the file (``Child.write_unlocked``, lent an
:class:`Unlocker`), as an await would; the pass keeps no graph state across that call.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import select
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import trio

from protocol import NEED_DATA, Disconnect, RemoteProtocolError, Request

from .transport import IOV_MAX, unsent
from .types import Buffer, FileRange, Outgoing

if TYPE_CHECKING:
    from .connection import Connection

#: Replies gathered by one pass are sent once they hold this many bytes.
SEND_BATCH_BYTES = 4 << 20
#: At most this many requests per pass: the pass holds the graph lock, and a client
#: pipelining tiny requests (1-byte READs, 4,700 per 128 KiB received) otherwise held it for
#: up to 37 ms, stalling every other connection and trio.
PASS_MAX_REQUESTS = 256
#: What the command line sets ``sys.setswitchinterval`` to (Python's default is 5 ms). A
#: thread that always has work (a client flooding tiny requests) gives up the GIL to others
#: only when this expires, so it decides how long other connections wait. Against a flood of
#: 1-byte READs, a QD1 client's reads took p99 23 ms without the pass limit, 85 ms with the
#: limit alone (the flooding thread never blocks in recv any more), 3 ms with the limit and
#: 0.5 ms; nbdcopy and fio throughput did not move measurably.
GIL_SWITCH_INTERVAL = 0.0005
#: Before blocking in ``recv`` with no request waiting in trio, a thread that is the server's
#: only connection thread tries this many non-blocking receives (about 2.5 µs each). A
#: client waiting for its reply (QD1) sends the next request within a few tens of
#: microseconds; catching it awake saves a thread wake-up: fio's 4K reads at QD1 went from
#: 9.5k to 17k IOPS (20 tries: 14k). Costs at most ~125 µs of CPU per idle period.
SPIN_RECEIVES = 50
#: One receive asks for this much: a batch of 16 4K writes fits. More would pull large
#: WRITE payloads through the protocol's buffer (two copies) instead of straight into their
#: own (``payload_buffer``): nbdcopy's 256K writes copied in 0.81-0.99 s with 1 MiB, 0.70-0.84
#: s with 128 KiB (1 GiB image).
_RECV_SIZE = 1 << 17
#: One entry per running connection thread (list append/pop are atomic under the GIL).
#: The receive spin is only for a thread that is alone: with others running, spinning
#: takes the GIL from threads with work (copying in with nbdcopy's 4 connections, the spin
#: took 39 % of the server's samples).
_THREADS: list[None] = []
#: How long the trio thread waits for a data thread to take the graph lock before it.
HANDOFF_MAX = 0.0005


class GraphLock(trio.abc.Instrument):
    """A lock that the trio thread holds except while it waits for I/O (see module doc).

    Fairness: a busy trio loop lets go between its batches of tasks (an I/O wait of 0 s) but
    would take the lock straight back before a waiting thread runs; measured, a data thread
    then got the lock 89 times a second instead of 11,000. So trio first lets any waiting
    thread through (for at most :data:`HANDOFF_MAX` seconds)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._waiting: list[None] = []  # one entry per data thread blocked in acquire()
        self._taken = threading.Event()  # a waiting thread got the lock

    def acquire(self) -> None:
        """Take the lock on a data thread."""
        if not self.lock.acquire(blocking=False):
            waiting = self._waiting
            waiting.append(None)  # list append/pop are atomic under the GIL; += is not
            try:
                self.lock.acquire()
            finally:
                waiting.pop()
            self._taken.set()

    def release(self) -> None:
        self.lock.release()

    def before_io_wait(self, timeout: float) -> None:
        self.lock.release()

    def after_io_wait(self, timeout: float) -> None:
        # Cleared first: a waiter seen below has not signalled yet, so no signal is lost.
        self._taken.clear()
        if self._waiting:
            # Block (GIL released) until the woken thread has the lock; merely yielding is
            # not enough, since that thread also needs the GIL to run.
            self._taken.wait(HANDOFF_MAX)
        self.lock.acquire()


class Unlocker:
    """Lent to ``Child.write_unlocked`` by a connection thread holding the graph lock: the
    ``with`` block runs without the lock; ``run_soon`` runs a function on the trio thread."""

    __slots__ = ("lock", "token")

    def __init__(self, lock: GraphLock, token: trio.lowlevel.TrioToken) -> None:
        self.lock = lock
        self.token = token

    def __enter__(self) -> None:
        self.lock.release()

    def __exit__(self, *exc_info: object) -> None:
        self.lock.acquire()

    def run_soon(self, fn: Callable[[], object]) -> None:
        self.token.run_sync_soon(fn)


_GRAPH_LOCK: trio.lowlevel.RunVar[GraphLock] = trio.lowlevel.RunVar("graph_lock")


def graph_lock() -> GraphLock:
    """This trio run's lock, installed on first use. Call from the trio thread."""
    try:
        return _GRAPH_LOCK.get()
    except LookupError:
        gl = GraphLock()
        gl.lock.acquire()  # we are running a task: the trio thread holds it from now on
        trio.lowlevel.add_instrument(gl)
        _GRAPH_LOCK.set(gl)
        return gl


class ThreadedLoop:
    """Reads requests, serves those that complete at once, sends every reply; hands the
    others to trio tasks, whose replies come back through :meth:`post`."""

    def __init__(self, conn: Connection, sock: socket.socket, nursery: trio.Nursery) -> None:
        self.conn = conn
        self.sock = sock
        self.nursery = nursery
        self.lock = graph_lock()
        self.token = trio.lowlevel.current_trio_token()
        self.error: BaseException | None = None
        self.finished = trio.Event()
        self._aborted = False
        self._done: collections.deque[Sequence[Buffer]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pending = 0  # requests handed to trio whose replies are not collected yet
        # Request tasks run in the connection task's context (its log fields), entered by
        # trio's entry queue one callback at a time; the thread runs in a copy of its own.
        self._task_context = contextvars.copy_context()

    # -- the trio side -----------------------------------------------------------------------

    async def run(self) -> None:
        """Run the loop on its own thread until the connection ends; re-raise its error."""
        # contextvars (the connection's log fields) do not cross into a new thread by
        # themselves.
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(self._thread_main,),
                                  name=f"nbd-conn-{self.conn.id}", daemon=True)
        try:
            thread.start()
            await self.finished.wait()
        finally:
            if thread.is_alive() and not self.finished.is_set():
                self._abort()  # cancelled: stop the thread, wait for it
                with trio.CancelScope(shield=True):
                    await self.finished.wait()
            # A request task may still finish after this (its post() is then dropped).
            wake, self._wake = self._wake, -1
            os.close(wake)
        if self.error is not None:
            raise self.error

    def post(self, reply: Sequence[Buffer]) -> None:
        """A trio task's reply: the thread sends it. Call from the trio thread."""
        if self._wake < 0:  # the thread is gone: the connection has ended
            return
        self._done.append(reply)
        os.eventfd_write(self._wake, 1)

    def _abort(self) -> None:
        self._aborted = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv or sendmsg
        os.eventfd_write(self._wake, 1)

    # -- the thread --------------------------------------------------------------------------

    def _thread_main(self) -> None:
        self.lock.acquire()
        _THREADS.append(None)
        try:
            self._loop()
        except BaseException as e:  # handed to trio, which logs it and ends the connection
            if isinstance(e, (OSError, RemoteProtocolError)):
                # Expected ends: without the traceback, the loop's frame (and the buffers
                # it holds) is freed now rather than by the cycle collector.
                e = e.with_traceback(None)
            self.error = e
        finally:
            _THREADS.pop()
            self.lock.release()
            self.token.run_sync_soon(self.finished.set)

    def _loop(self) -> None:
        conn, lock, sock = self.conn, self.lock, self.sock
        # Each pass takes the bare lock; GraphLock.acquire only when another holds it.
        try_acquire, release = lock.lock.acquire, lock.lock.release
        tx = conn._tx
        serve_now, dispatch = conn._serve_now, self._dispatch
        unlock = Unlocker(lock, self.token)
        max_in_flight = conn.max_in_flight
        view = memoryview(bytearray(_RECV_SIZE))
        waiting = select.poll()  # for replies from trio and, while reading, for requests
        waiting.register(self._wake, select.POLLIN)
        replies_only = select.poll()
        replies_only.register(self._wake, select.POLLIN)
        out: list[Outgoing] = []
        pending_bytes = 0
        held: Request | None = None  # a request waiting for a slot or payload budget
        fatal: RemoteProtocolError | None = None
        reading = True
        after_payload = False  # the last receive went into a large WRITE's own buffer
        done = self._done
        while True:
            # Replies from trio first: a request they free room for may start below, and
            # none is lost if this pass ends the connection.
            while done:
                out.extend(done.popleft())
                self._pending -= 1
            if held is not None and self._may_start(held):
                dispatch(held)
                held = None
            need_data = False  # set once the protocol has no complete request left
            taken = 0
            while (reading and held is None and pending_bytes < SEND_BATCH_BYTES
                   and taken < PASS_MAX_REQUESTS):
                taken += 1
                try:
                    event = tx.next_plain()
                except RemoteProtocolError as e:
                    if not conn._stopping:
                        fatal = e
                        break
                    event = None  # we cut the stream ourselves, mid-request
                if type(event) is tuple or type(event) is Request:
                    answered = serve_now(event, out, unlock)
                    if isinstance(answered, int):
                        pending_bytes += answered
                    elif self._may_start(answered):
                        dispatch(answered)
                    else:
                        held = answered
                    continue
                if event is NEED_DATA:
                    need_data = True
                    break
                # NBD_CMD_DISC, or EOF between requests: requests in flight still finish.
                reading = False
                if isinstance(event, Disconnect):
                    conn.end_reason = "disconnect"
                elif conn._stopping:
                    conn.end_reason = "shutdown"
            if fatal is not None:  # answer what was served, then end the connection
                lock.release()
                try:
                    self._send_replies(out)
                finally:
                    lock.acquire()
                raise fatal
            if self._aborted or (not reading and not self._pending and not out):
                return
            # Everything below may block: the lock goes.
            release()
            try:
                if out:
                    self._send_replies(out)
                    out, pending_bytes = [], 0
                if not reading or held is not None or self._pending >= max_in_flight:
                    if self._pending:
                        replies_only.poll()
                        self._clear_wake()
                    continue
                if not need_data:  # the batch filled up: serve the rest of what is buffered
                    continue
                received = -1
                payload = tx.payload_buffer()  # a large WRITE payload: straight into it
                if payload is not None:
                    target = payload
                elif after_payload and (missing := tx.header_missing()):
                    # Large WRITEs come in runs (a copy): take only the next header, so
                    # that the next payload is not copied through the protocol's buffer.
                    target = view[:missing]
                else:
                    target = view
                if self._pending:
                    waiting.register(sock, select.POLLIN)
                    waiting.poll()
                    waiting.unregister(sock)
                    self._clear_wake()
                    try:
                        received = sock.recv_into(target, 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:  # woken by a reply only
                        if payload is not None:
                            payload.release()
                        continue
                else:
                    for _ in range(SPIN_RECEIVES if len(_THREADS) == 1 else 0):
                        try:
                            received = sock.recv_into(target, 0, socket.MSG_DONTWAIT)
                            break
                        except BlockingIOError:
                            pass
                    if received < 0:
                        # A payload arrives whole before the lock is taken again: one
                        # wake-up and one acquisition per request, not one per chunk.
                        flags = socket.MSG_WAITALL if payload is not None else 0
                        received = sock.recv_into(target, 0, flags)
            finally:
                if not try_acquire(False):
                    lock.acquire()
            after_payload = payload is not None
            if payload is not None:
                payload.release()  # the pool reuses a buffer only once no view of it is left
                tx.payload_received(received)
            else:
                tx.receive_data(view[:received])

    def _clear_wake(self) -> None:
        # Posted but not yet signalled raises: the next poll then returns at once.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)

    def _may_start(self, request: Request) -> bool:
        conn = self.conn
        if self._pending >= conn.max_in_flight:
            return False
        return not conn.budget.must_wait(conn.in_flight_bytes, conn.budget.cost(request))

    def _dispatch(self, request: Request) -> None:
        conn = self.conn
        cost = conn.budget.cost(request)
        conn.in_flight_bytes += cost
        conn.budget.take(cost)
        self._pending += 1
        start: Callable[..., object] = self.nursery.start_soon
        self.token.run_sync_soon(self._task_context.run, start, conn._serve_later, request, cost)

    def _send_replies(self, out: list[Outgoing]) -> None:
        """Send a pass's replies. Only this thread's passes add FileRanges (counted by the
        connection), so the count needs no lock."""
        conn = self.conn
        if conn.file_ranges:
            conn.file_ranges = 0
            self._send_files(out)
        else:
            self._send(out)

    def _send_files(self, items: list[Outgoing]) -> None:
        """:meth:`_send` for replies that carry FileRange items: the buffers before
        each range go out with ``sendmsg``, the range with ``sendfile`` (no copy through
        Python; from a file in memory the pages themselves are queued on the socket)."""
        sock = self.sock
        start = 0
        for i, item in enumerate(items):
            if type(item) is FileRange:
                if start < i:  # over TCP, the header waits to leave with the data
                    self._send(items[start:i], socket.MSG_MORE)
                start = i + 1
                fd, offset, left = item.fd, item.offset, item.length
                while left:
                    sent = os.sendfile(sock.fileno(), fd, offset, left)
                    if not sent:
                        # The file shrank under us since the header went out: what is gone
                        # reads as zeros, as a hole would.
                        self._send([bytes(left)])
                        break
                    offset += sent
                    left -= sent
        if start < len(items):
            self._send(items[start:])

    def _send(self, items: list[Outgoing], flags: int = 0) -> None:
        """Write every buffer, in order, completely (blocking); ``items`` holds no
        FileRange (then :meth:`_send_files`)."""
        sock = self.sock
        buffers = cast("list[Buffer]", items)
        pending = buffers
        if len(buffers) <= IOV_MAX:
            # One call nearly always takes everything (a blocking sendmsg returns early
            # only when a signal cuts it short): summing is cheaper than unsent().
            sent = sock.sendmsg(buffers, (), flags)
            if sent == sum(map(len, buffers)):
                return
            pending = unsent(buffers, sent)
        while pending:
            pending = unsent(pending, sock.sendmsg(pending[:IOV_MAX], (), flags))
