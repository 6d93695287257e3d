"""Human sizes on the command line, as qemu and nbdkit accept them: ``512``, ``64K``,
``1.5G``, ``2TiB``. The block layer's parser, with errors that name the argument."""

from __future__ import annotations

from .block.options import parse_size as _parse_size
from .errors import ConfigError


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes for ``text``. Raises :class:`ConfigError` naming ``what`` and the bad text."""
    try:
        return _parse_size(text)
    except ValueError as e:
        raise ConfigError(f"invalid {what} {text!r}: {e}") from None
