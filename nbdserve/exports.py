"""Exports: a name and a root edge into the block graph, described to the protocol.

Everything advertised to clients is derived here from the edge's real capabilities and
limits (``child.caps``, ``child.limits``), so nothing is promised that the graph cannot do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from protocol import ExportInfo, TransmissionFlag

from .block import Child, Graph, Perm
from .config import ExportSpec
from .errors import ConfigError

#: The NBD spec's default maximum payload, and qemu's NBD_MAX_BUFFER_SIZE.
MAX_PAYLOAD = 32 << 20
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"


@dataclass(eq=False)
class Export:
    spec: ExportSpec
    child: Child
    info: ExportInfo

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def writethrough(self) -> bool:
        return self.spec.writethrough


def describe(spec: ExportSpec, child: Child, *, multi_conn_allowed: bool) -> ExportInfo:
    """The ExportInfo the handshake advertises for ``child``."""
    caps = child.caps
    flags = TransmissionFlag(0)
    writable = spec.writable and not caps.read_only
    if not writable:
        flags |= TransmissionFlag.READ_ONLY
    # FLUSH and FUA are always honoured: a node without a volatile cache (memory, null) has
    # nothing to flush, so both succeed at once and are still true to their meaning.
    flags |= TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    # TRIM and CACHE are hints: where the node's discard policy is "ignore" or the driver has
    # no use for a prefetch they succeed doing nothing, as the spec allows. Advertising them
    # anyway matches qemu-nbd, so clients that trim or prefetch behave the same with both.
    flags |= TransmissionFlag.SEND_CACHE
    if writable:
        flags |= TransmissionFlag.SEND_TRIM
        if caps.can_zero:
            # The generic layer refuses NO_FALLBACK fast when zeroing would be slow, which is
            # exactly the FAST_ZERO contract.
            flags |= TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
    if caps.multi_conn_safe and multi_conn_allowed:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    limits = child.limits
    # Minimum 1: the generic request path pads and read-modify-writes unaligned requests, so
    # clients need not align (qemu does the same unless the client asks).
    preferred = max(4096, limits.request_alignment, min(limits.opt_transfer, MAX_PAYLOAD))
    maximum = min(limits.max_transfer, MAX_PAYLOAD) if limits.max_transfer else MAX_PAYLOAD
    preferred = min(preferred, maximum) if maximum >= 4096 else preferred
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    if spec.allocation_depth:
        contexts += (ALLOCATION_DEPTH,)
    return ExportInfo(name=spec.name, size=child.size, flags=flags,
                      description=spec.description, block_size=(1, preferred, maximum),
                      contexts=contexts)


class Catalogue:
    """The protocol's view of the exports (protocol.Catalogue)."""

    def __init__(self, exports: Sequence[Export]) -> None:
        self._by_name = {e.name: e for e in exports}
        self._exports = list(exports)

    def lookup(self, name: str) -> ExportInfo | None:
        export = self.export(name)
        return export.info if export is not None else None

    def exports(self) -> Iterable[ExportInfo]:
        return [e.info for e in self._exports]

    def export(self, name: str) -> Export | None:
        """The export called ``name``; "" also names the only export of a one-export server
        (what nbdkit does, so ``nbd://host`` works whatever the export is called)."""
        export = self._by_name.get(name)
        if export is None and name == "" and len(self._exports) == 1:
            export = self._exports[0]
        return export

    def __iter__(self) -> Iterator[Export]:
        return iter(self._exports)


def attach_exports(graph: Graph, specs: Sequence[ExportSpec], *,
                   multi_conn_allowed: bool) -> list[Export]:
    """Attach one root edge per export, with the permissions it needs (qemu's BlockBackend
    for an NBD export: consistent read, plus write when writable; others may read and write
    too, unless resizing)."""
    exports = []
    try:
        for spec in specs:
            if spec.node_name not in graph.nodes:
                raise ConfigError(f"export {spec.name!r}: no node named {spec.node_name!r}")
            perm = Perm.CONSISTENT_READ | (Perm.WRITE if spec.writable else Perm.NONE)
            shared = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED
            child = graph.attach(spec.node_name, perm=perm, shared=shared,
                                 user=f"export {spec.name!r}")
            if spec.writable and child.caps.read_only:
                child.detach()
                raise ConfigError(f"export {spec.name!r}: node {spec.node_name!r} is "
                                  "read-only and cannot be exported writable")
            exports.append(Export(spec, child, describe(spec, child,
                                                        multi_conn_allowed=multi_conn_allowed)))
    except BaseException:
        for export in exports:
            export.child.detach()
        raise
    return exports
