"""Errors that say whose fault they are (h11 style)."""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base of every error raised by :mod:`protocol`."""


class LocalProtocolError(ProtocolError):
    """Our own code misused the API (sent something illegal in the current state)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol.

    The connection must be dropped: write whatever ``data_to_send()`` still holds (it may be
    empty), then close. Nothing the protocol allows can resynchronise the stream.
    """
