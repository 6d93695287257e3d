"""Human sizes as qemu and nbdkit accept them: ``512``, ``64K``, ``1.5G``, ``2TiB``."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
          "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTPEB]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes for ``text``; a fraction is allowed with a unit (``1.5G``), the result must be a
    whole number of bytes. Raises :class:`ConfigError` naming ``what`` and the bad text."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ConfigError(f"invalid {what} {text!r}: expected a number with an optional "
                          "K/M/G/T/P/E suffix")
    number, unit = m.group(1), m.group(2).upper()
    scale = _UNITS[unit]
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * scale + int(frac) * scale // 10 ** len(frac)
        if int(frac) * scale % 10 ** len(frac):
            raise ConfigError(f"invalid {what} {text!r}: not a whole number of bytes")
    else:
        value = int(number) * scale
    if value >= 1 << 63:
        raise ConfigError(f"invalid {what} {text!r}: too large")
    return int(value)
