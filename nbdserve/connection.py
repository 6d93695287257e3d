"""One client connection: the handshake, then the transmission loop.

The loop's shape comes from the benchmarks. A single reader takes every complete request
already received, serves at once those the block layer can complete without waiting (page
cache reads and writes through ``read_nowait``/``write_nowait``), and sends all their replies
with one ``sendmsg``. Requests that would block, and every other command, run as tasks, at most
``max_in_flight`` at a time, within the server's payload budget; when either is used up the
reader stops reading, which pushes back on the client. One task writes at a time, each reply
whole, so replies never interleave; replies that finish while it writes go out together in its
next ``sendmsg``. Nothing on this path logs unless debug logging is on; statistics are
integers, summarised in one line when the connection ends.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

import structlog
import trio

from protocol import (
    NEED_DATA,
    Aborted,
    Closed,
    Cmd,
    CmdFlag,
    Disconnect,
    Errno,
    OptionHandled,
    PlainRequest,
    Ready,
    RemoteProtocolError,
    Request,
    ServerHandshake,
    ServerTransmission,
    Session,
    StartTLS,
    TLSMode,
    TransmissionFlag,
)

from .block.buffers import BufferPool
from .block.io import Unlocker
from .block.zeros import is_zero
from .commands import HANDLERS, SPARSE_READ_MIN, CommandContext
from .datapath import PASS_MAX_REQUESTS, ThreadedLoop
from .errors import nbd_errno
from .exports import MAX_PAYLOAD, Catalogue, Export
from .log import get_logger
from .stats import ConnectionStats
from .transport import SocketTransport, StreamTransport, Transport
from .types import Buffer, FileRange, Outgoing

#: One receive call asks for this much: many small requests, or a whole 1 MiB write.
RECV_SIZE = 1 << 20
#: A READ or WRITE this large, on a connection thread, copies out of or into the file
#: without the graph lock (``Child.read_unlocked``, ``write_unlocked``), so that several
#: connections' copies overlap. Smaller ones cost less than letting the lock go and taking
#: it back.
UNLOCKED_MIN = 64 << 10
#: Replies gathered by one pass are sent once they hold this many bytes, which bounds the
#: memory a burst of page-cache reads can pin.
SEND_BATCH_BYTES = 4 << 20

#: Page-aligned, recycled buffers for large WRITE payloads, shared by every connection: the
#: payload is received straight into one, and the kernel copies aligned memory into the page
#: cache several times faster than a malloc'ed bytearray (see block/buffers.py). Bounded; past
#: the bound a payload gets an unpooled buffer.
_PAYLOADS = BufferPool(max_bytes=16 << 20)

#: Before sending a batch of replies, this many more non-blocking receives may add the requests
#: that arrived meanwhile to it.
GATHER_PASSES = 4
#: Batches that make no such try after one that found nothing.
GATHER_BACKOFF = 8

#: Checks a TLS client after its handshake: None to accept, else the reason for refusing.
TLSAuthz = Callable[["trio.SSLStream[trio.abc.Stream]"], "str | None"]

#: Default payload budget of a server (see PayloadBudget).
DEFAULT_MAX_IN_FLIGHT_BYTES = 64 << 20

_ids = itertools.count(1)

class PayloadBudget:
    """READ/WRITE payload bytes held by request tasks, shared by every connection of a server
    so that memory is bounded by configuration, not by how many clients pipeline big writes.
    A connection with nothing in flight may always start one request: no one starves."""

    def __init__(self, limit: int = DEFAULT_MAX_IN_FLIGHT_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self._freed = trio.Event()

    @staticmethod
    def cost(request: Request) -> int:
        """What a request task holds of the budget: its READ or WRITE payload."""
        return request.length if request.cmd is Cmd.READ or request.cmd is Cmd.WRITE else 0

    def must_wait(self, own: int, cost: int) -> bool:
        return own > 0 and self.used + cost > self.limit

    async def wait_freed(self) -> None:
        await self._freed.wait()

    def take(self, cost: int) -> None:
        self.used += cost

    def give(self, cost: int) -> None:
        self.used -= cost
        self._freed.set()
        self._freed = trio.Event()
_READ, _WRITE = int(Cmd.READ), int(Cmd.WRITE)
_FUA, _DF = int(CmdFlag.FUA), int(CmdFlag.DF)


class Connection:
    def __init__(self, transport: Transport, catalogue: Catalogue, *,
                 handshake_timeout: float = 10.0, max_in_flight: int = 16,
                 budget: PayloadBudget | None = None,
                 tls: TLSMode = TLSMode.OFF, ssl_context: ssl.SSLContext | None = None,
                 tls_authz: TLSAuthz | None = None) -> None:
        self.id = next(_ids)
        self.transport = transport
        self.catalogue = catalogue
        self.handshake_timeout = handshake_timeout
        self.max_in_flight = max_in_flight
        self.tls = tls
        self.ssl_context = ssl_context
        self.tls_authz = tls_authz
        self.stats = ConnectionStats()
        self.session: Session | None = None
        self.export: Export | None = None
        self.end_reason = "eof"
        self._log = get_logger(transport=transport.kind)
        self._debug = self._log.is_enabled_for(logging.DEBUG)
        self._scope = trio.CancelScope()
        self._stopping = False
        self._in_transmission = False
        # Reply writing: one sender at a time; others queue behind it (see _send).
        self._sending = False
        self._queued: list[Outgoing] = []
        self._queue_sent = trio.Event()
        self._slots = trio.Semaphore(max_in_flight)
        # Payload bytes of this connection's request tasks, against the server's budget.
        self.budget = budget if budget is not None else PayloadBudget()
        self.in_flight_bytes = 0
        # FileRanges _serve_now put in its caller's list since the caller last looked.
        self.file_ranges = 0
        # Set while a ThreadedLoop serves this connection: request tasks post replies to it.
        self._threaded: ThreadedLoop | None = None
        self._tx: ServerTransmission
        self._ctx: CommandContext

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection to its end. Never raises (but for cancellation): one client's
        failure must not touch the server or other clients."""
        # Bound in this task's context before any request task starts (trio copies the
        # context at spawn), so block-layer log lines of this connection carry these too.
        structlog.contextvars.bind_contextvars(conn=self.id, peer=self.transport.peer)
        try:
            with self._scope:
                ready = await self._handshake()
                if ready is not None and not self._stopping:
                    await self._transmission(*ready)
            if self._scope.cancelled_caught and self.end_reason == "eof":
                self.end_reason = "shutdown" if self._stopping else "cancelled"
        except Exception as e:
            self.end_reason = "error"
            self._log.error("connection failed", error=f"{type(e).__name__}: {e}",
                            exc_info=self._debug)
        finally:
            with trio.CancelScope(shield=True):
                await self.transport.aclose()
            self._log_summary()

    def stop(self) -> None:
        """Graceful shutdown: take no new requests, finish those in flight, then close. A
        connection still negotiating is simply dropped."""
        if self._stopping:
            return
        self._stopping = True
        if self._in_transmission:
            self.transport.stop_receiving()
        else:
            self._scope.cancel()

    def _log_summary(self) -> None:
        fields: dict[str, Any] = self.stats.summary()
        session = self.session
        if session is not None:
            flags = [f.name.lower() for f in TransmissionFlag
                     if f in session.flags and f.name is not None]
            fields.update(export=session.export.name, flags=flags,
                          structured=session.structured,
                          extended=session.extended, contexts=sorted(session.contexts.values()),
                          tls=session.tls)
        self._log.info("connection closed", reason=self.end_reason, **fields)

    # -- handshake ---------------------------------------------------------------------------

    async def _handshake(self) -> tuple[Session, bytes] | None:
        hs = ServerHandshake(self.catalogue, tls=self.tls)
        with trio.move_on_after(self.handshake_timeout if self.handshake_timeout > 0
                                else math.inf) as timer:
            try:
                await self.transport.send([hs.initiate()])
                while True:
                    event = hs.next_event()
                    out = hs.data_to_send()
                    if out:
                        await self.transport.send([out])
                    if event is NEED_DATA:
                        hs.receive_data(await self.transport.receive(RECV_SIZE))
                    elif isinstance(event, OptionHandled):
                        if self._debug:
                            self._log.debug("option", option=str(event.option),
                                            reply=str(event.reply))
                    elif isinstance(event, StartTLS):
                        if not await self._start_tls(hs):
                            return None
                    elif isinstance(event, Ready):
                        return event.session, event.leftover
                    elif isinstance(event, Aborted):
                        self.end_reason = "aborted"
                        return None
                    elif isinstance(event, Closed):
                        self.end_reason = "eof"
                        return None
                    else:
                        # STARTTLS with TLS off is refused inside the protocol; anything else
                        # here is a new event this server does not know yet.
                        raise RuntimeError(f"unexpected handshake event {event!r}")
            except RemoteProtocolError as e:
                await self._send_quietly(hs.data_to_send())
                self.end_reason = "protocol error"
                self._log.warning("handshake failed", error=str(e))
                return None
            except OSError as e:
                self.end_reason = "vanished"
                if self._debug:
                    self._log.debug("handshake I/O error", error=str(e))
                return None
        if timer.cancelled_caught:
            self.end_reason = "handshake timeout"
            self._log.warning("handshake timed out", timeout=self.handshake_timeout)
        return None

    async def _start_tls(self, hs: ServerHandshake) -> bool:
        """Upgrade to TLS after STARTTLS was acknowledged (the ACK has been written). The
        protocol then forgets everything negotiated in plaintext."""
        if self.ssl_context is None:
            raise RuntimeError("STARTTLS accepted but no TLS credentials are configured")
        old = self.transport
        stream = trio.SSLStream(old.into_stream(), self.ssl_context, server_side=True)
        self.transport = StreamTransport(stream, kind=old.kind, peer=old.peer)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            self.end_reason = "tls failed"
            self._log.warning("TLS handshake failed", error=str(e.__cause__ or e))
            return False
        if self.tls_authz is not None:
            refusal = self.tls_authz(stream)
            if refusal is not None:
                self.end_reason = "tls refused"
                self._log.warning("TLS client not authorised", reason=refusal)
                return False
        hs.tls_established()
        return True

    async def _send_quietly(self, data: bytes) -> None:
        if data:
            with contextlib.suppress(OSError):
                await self.transport.send([data])

    # -- transmission ------------------------------------------------------------------------

    async def _transmission(self, session: Session, leftover: bytes) -> None:
        export = self.catalogue.export(session.export.name)
        if export is None:  # pragma: no cover - the handshake only selects catalogued exports
            raise RuntimeError(f"handshake selected unknown export {session.export.name!r}")
        self.session, self.export = session, export
        if self._debug:
            self._log.debug("transmission", export=export.name, flags=str(session.flags),
                            structured=session.structured, extended=session.extended)
        self._tx = ServerTransmission(session, max_payload=MAX_PAYLOAD, leftover=leftover,
                                      payload_allocator=_PAYLOADS.take)
        self._ctx = CommandContext(export, self._tx)
        self._in_transmission = True
        failure: RemoteProtocolError | OSError | None = None
        async with trio.open_nursery() as nursery:
            try:
                transport = self.transport
                if isinstance(transport, SocketTransport):
                    sock = transport.socket
                    sock.setblocking(True)  # the thread blocks in recv and sendmsg
                    self._threaded = ThreadedLoop(self, sock, nursery)
                    await self._threaded.run()
                else:
                    await self._read_loop(nursery)
            except (RemoteProtocolError, OSError) as e:
                # Caught here, not outside: out of a nursery it would come as a group.
                failure = e
                nursery.cancel_scope.cancel()  # requests in flight have no one to answer
        # Without a failure, every in-flight request has been answered (the nursery waited).
        if isinstance(failure, RemoteProtocolError):
            self.end_reason = "protocol error"
            self._log.warning("client broke the protocol", error=str(failure))
        elif failure is not None:
            if self.end_reason in ("eof", "disconnect"):  # as _send: "shutdown" stays
                self.end_reason = "vanished"
            if self._debug:
                self._log.debug("I/O error", error=str(failure))

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        tx, transport, slots = self._tx, self.transport, self._slots
        serve_now = self._serve_now
        out: list[Outgoing] = []
        pending = gathered = gather_skip = served = 0
        while True:
            while True:
                try:
                    event = tx.next_plain()
                except RemoteProtocolError:
                    if not self._stopping:
                        if out:
                            await self._send(out)
                        raise
                    event = Closed()  # we cut the stream ourselves, mid-request
                if type(event) is tuple or type(event) is Request:
                    answered = serve_now(event, out)
                    if isinstance(answered, int):
                        pending += answered
                        served += 1
                        if pending >= SEND_BATCH_BYTES or served >= PASS_MAX_REQUESTS:
                            # Bounded passes: tiny pipelined requests must not keep the loop
                            # (and every other connection) waiting.
                            await self._send(out)
                            out, pending, served = [], 0, 0
                            await trio.lowlevel.checkpoint()
                        continue
                    event = answered  # needs a task (below)
                if type(event) is Request:
                    # Back-pressure: with every slot (or the payload budget) in use, answer
                    # what is ready, then wait before taking more requests off the wire.
                    cost = self.budget.cost(event)
                    budget = self.budget
                    if slots.value == 0 or budget.must_wait(self.in_flight_bytes, cost):
                        if out:
                            await self._send(out)
                            out, pending = [], 0
                        while budget.must_wait(self.in_flight_bytes, cost):
                            await budget.wait_freed()
                        await slots.acquire()
                    else:
                        slots.acquire_nowait()
                    self.in_flight_bytes += cost
                    budget.take(cost)
                    nursery.start_soon(self._serve_later, event, cost)
                    continue
                if event is NEED_DATA:
                    break
                # NBD_CMD_DISC, or EOF between requests: in-flight requests still finish.
                if out:
                    await self._send(out)
                if isinstance(event, Disconnect):
                    self.end_reason = "disconnect"
                elif self._stopping:
                    self.end_reason = "shutdown"
                return
            if out:
                # Requests that arrived while this batch was served join it: one sendmsg,
                # one wake-up of the client, for all their replies.
                # A client that waits for each reply (QD1) never has more to send: after a
                # first try that finds nothing, skip the next few batches' tries.
                if gather_skip:
                    gather_skip -= 1
                elif gathered < GATHER_PASSES and tx.payload_buffer() is None:
                    data = transport.receive_nowait(RECV_SIZE)
                    if data is not None:
                        gathered += 1
                        tx.receive_data(data)
                        continue
                    if not gathered:
                        gather_skip = GATHER_BACKOFF
                await self._send(out)
                out, pending, gathered, served = [], 0, 0, 0
            view = tx.payload_buffer()
            if view is not None:
                received = await transport.receive_into(view)
                view.release()  # the pool reuses a buffer only once no view of it is left
                tx.payload_received(received)
            else:
                tx.receive_data(await transport.receive(RECV_SIZE))

    def _serve_now(
        self, event: PlainRequest | Request, out: list[Outgoing], unlock: Unlocker | None = None
    ) -> int | Request:
        """Answer at once what can be, for both transmission loops: a request that failed
        validation, or a valid READ or WRITE (plain fields from ``next_plain``: no request
        object on the hot path) that the block layer completes without waiting. The reply
        goes to ``out``; returns its bytes, or the Request that needs a task. A connection
        thread passes ``unlock``: large writes then copy without the graph lock, and large
        reads of a file in memory go out with ``sendfile`` (a :class:`FileRange` in ``out``,
        counted in ``file_ranges``)."""
        if isinstance(event, Request):
            if event.error is not None:
                return self._refuse(event, out)
            self.stats.counts[event.cmd] += 1  # FLUSH, TRIM, BLOCK_STATUS, ...: always a task
            return event
        plain = event
        cmd, flags, _, offset, length, data = plain
        stats = self.stats
        stats.counts[cmd] += 1
        if flags & _FUA:
            return self._tx.as_request(plain)
        ctx = self._ctx
        try:
            if cmd == _READ:
                buf = None
                if unlock is not None and length >= UNLOCKED_MIN:
                    where = ctx.child.read_splice(offset, length)
                    if where is not None:
                        stats.bytes_read += length
                        head = self._tx.reply_read_head_plain(plain)
                        out.append(head)
                        out.append(FileRange(where[0], where[1], length))
                        self.file_ranges += 1
                        return len(head) + length
                    buf = ctx.child.read_unlocked(offset, length, unlock)
                if buf is None:
                    buf = ctx.child.read_nowait(offset, length)
                if buf is not None:
                    stats.bytes_read += length
                    if (length >= SPARSE_READ_MIN and ctx.structured and not flags & _DF
                            and is_zero(buf)):
                        hole = self._tx.reply_read_chunks(self._tx.as_request(plain),
                                                          [(offset, length)])
                        out.extend(hole)
                        return sum(len(b) for b in hole)
                    out.extend(self._tx.reply_read_plain(plain, buf))
                    return length
            elif not ctx.writethrough and (
                (unlock is not None and length >= UNLOCKED_MIN
                 and ctx.child.write_unlocked(offset, data, unlock))  # type: ignore[arg-type]
                or ctx.child.write_nowait(offset, data)  # type: ignore[arg-type]
            ):
                stats.bytes_written += length
                reply = self._tx.reply_ok_plain(plain)
                out.append(reply)
                return len(reply)
        except OSError as e:
            reply = self._error_reply(self._tx.as_request(plain), e)
            out.append(reply)
            return len(reply)
        return self._tx.as_request(plain)

    def _refuse(self, request: Request, out: list[Outgoing]) -> int:
        """Answer a request that failed the protocol's validation; returns the bytes appended."""
        stats = self.stats
        stats.count_other(request.cmd)
        stats.errors += 1
        reply = self._tx.reply(request)
        out.append(reply)
        if self._debug:
            self._log.debug("request refused", cmd=str(request.cmd), offset=request.offset,
                            length=request.length, error=request.error.name,  # type: ignore[union-attr]
                            message=request.message)
        return len(reply)

    async def _serve_later(self, request: Request, cost: int) -> None:
        """A request that may wait: run it through the command table, send its reply."""
        try:
            if self._debug:
                self._log.debug("request", cmd=str(request.cmd), offset=request.offset,
                                length=request.length, flags=str(request.flags))
            handler = HANDLERS.get(request.cmd)
            try:
                if handler is None:
                    raise OSError(errno.EINVAL, "command not supported")
                reply = await handler(self._ctx, request)
                if request.cmd is Cmd.READ:
                    self.stats.bytes_read += request.length
                elif request.cmd is Cmd.WRITE:
                    self.stats.bytes_written += request.length
            except OSError as e:
                reply = [self._error_reply(request, e)]
            except Exception as e:
                # A bug below us: the client gets EIO, the connection and server live on.
                self._log.error("request failed", cmd=str(request.cmd), offset=request.offset,
                                length=request.length, error=f"{type(e).__name__}: {e}",
                                exc_info=True)
                self.stats.errors += 1
                reply = [self._tx.reply(request, Errno.EIO, "internal server error")]
            if self._threaded is not None:
                self._threaded.post(reply)
            else:
                await self._send(reply)
        finally:
            if self._threaded is None:
                self._slots.release()
            self.in_flight_bytes -= cost
            self.budget.give(cost)

    def _error_reply(self, request: Request, e: OSError) -> bytes:
        self.stats.errors += 1
        fast_zero = request.cmd is Cmd.WRITE_ZEROES and bool(request.flags & CmdFlag.FAST_ZERO)
        error = nbd_errno(e.errno, fast_zero=fast_zero)
        what = request.cmd.name.lower() if isinstance(request.cmd, Cmd) else "request"
        message = f"{what} failed: {e.strerror or e}"
        if self._debug:
            self._log.debug("request failed", cmd=what, offset=request.offset,
                            length=request.length, error=error.name, message=message)
        return self._tx.reply(request, error, message)

    async def _send(self, buffers: Sequence[Outgoing]) -> None:
        """Write whole replies; return once they are on the wire.

        Replies that finish while a send is in progress are gathered and go out together in
        the next ``sendmsg`` (one system call for many replies under load). A caller still
        waits until its own bytes are sent, so the memory held by replies stays bounded by
        the in-flight limit. A client that is gone ends the connection here, whichever task
        noticed first."""
        if self._sending:
            self._queued.extend(buffers)
            sent = self._queue_sent
            await sent.wait()
            return
        self._sending = True
        try:
            # FileRanges come only from a connection thread, which sends its own replies.
            await self.transport.send(cast("Sequence[Buffer]", buffers))
            while self._queued:
                batch, sent = self._queued, self._queue_sent
                self._queued, self._queue_sent = [], trio.Event()
                await self.transport.send(cast("Sequence[Buffer]", batch))
                sent.set()
        except OSError as e:
            if self.end_reason in ("eof", "disconnect"):
                self.end_reason = "vanished"
            if self._debug:
                self._log.debug("send failed", error=str(e))
            self._scope.cancel()
        finally:
            self._sending = False
            # Wake waiters even on failure: the cancelled scope ends them right after.
            self._queue_sent.set()
            self._queue_sent = trio.Event()
