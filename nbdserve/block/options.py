"""QEMU-style options: the dotted ``key.sub=value`` form, nesting, and typing by :class:`Opt`.

Values from the dotted form stay strings until a driver's :class:`Opt` types them, so the
same option reads the same from JSON (``{"size": 1048576}``) and from a command line
(``size=1M``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .driver import Opt
from .errors import GraphError

__all__ = ["coerce", "parse_dotted", "parse_size", "unflatten"]

_SUFFIXES = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
    "P": 1 << 50,
    "E": 1 << 60,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPEB]?)(?:i?B)?\s*$", re.IGNORECASE)
_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}


def parse_dotted(text: str) -> dict[str, Any]:
    """Parse qemu's ``key=value,a.b=value`` form into nested dicts (``,,`` is a literal comma).

    Dicts whose keys are exactly ``0..n-1`` become lists, as in qemu's keyval parser, so
    ``inject-error.0.errno=EIO`` gives ``{"inject-error": [{"errno": "EIO"}]}``.
    """
    flat: dict[str, str] = {}
    for item in _split_commas(text):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GraphError(f"expected key=value, got {item!r} in {text!r}")
        if key in flat:
            raise GraphError(f"option '{key}' given twice in {text!r}")
        flat[key] = value
    return unflatten(flat)


def _split_commas(text: str) -> list[str]:
    items, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    return items


def unflatten(options: Mapping[str, Any]) -> dict[str, Any]:
    """Turn dotted keys into nested dicts (recursively), merging with nested dicts given as
    values; convert ``0..n-1`` keyed dicts into lists."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise GraphError(f"option names must be strings, got {key!r}")
        parts = key.split(".")
        if any(not p for p in parts):
            raise GraphError(f"malformed option name {key!r}")
        target = out
        for i, part in enumerate(parts[:-1]):
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise GraphError(f"option '{'.'.join(parts[: i + 1])}' is both a value and a group")
            target = nxt
        last = parts[-1]
        if isinstance(value, Mapping):
            value = unflatten(value)
            existing = target.get(last)
            if isinstance(existing, dict):
                _merge(existing, value, key)
                continue
        if last in target:
            raise GraphError(f"option '{key}' given twice")
        target[last] = value
    return {k: _listify(v) for k, v in out.items()}


def _merge(into: dict[str, Any], more: dict[str, Any], where: str) -> None:
    for k, v in more.items():
        if k in into:
            if isinstance(into[k], dict) and isinstance(v, dict):
                _merge(into[k], v, f"{where}.{k}")
                continue
            raise GraphError(f"option '{where}.{k}' given twice")
        into[k] = v


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        value = {k: _listify(v) for k, v in value.items()}
        if (
            value
            and all(k.isdigit() for k in value)
            and sorted(map(int, value)) == list(range(len(value)))
        ):
            return [value[str(i)] for i in range(len(value))]
        return value
    if isinstance(value, list):
        return [_listify(v) for v in value]
    return value


def parse_size(value: Any) -> int:
    """An int, or a string such as ``512``, ``64K``, ``1.5G``, ``2MiB``; never negative."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number, suffix = m.groups()
            scale = _SUFFIXES[suffix.upper()]
            whole, _, frac = number.partition(".")
            # Exact arithmetic: a float would round sizes past 2^53.
            size = int(whole) * scale + (int(frac) * scale // 10 ** len(frac) if frac else 0)
            if frac and int(frac) * scale % 10 ** len(frac):
                raise ValueError("not a whole number of bytes")
            if size >= 1 << 63:
                raise ValueError("too large")
            return size
    raise ValueError("expected a size such as 4096, 64K or 1G")


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError("expected on/off (or true/false)")


def coerce(opt: Opt, value: Any) -> Any:
    """Type one option value; ``ValueError`` says what was expected."""
    kind = opt.kind
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if kind is bool:
        return parse_bool(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if kind == "size":
        return parse_size(value)
    if isinstance(kind, tuple):
        if value not in kind:
            raise ValueError(f"expected one of {', '.join(map(str, kind))}, got {value!r}")
        return value
    if kind is list:
        if isinstance(value, dict) and not value:
            return []
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a group of options, got {value!r}")
        return value
    raise TypeError(f"unsupported option kind {kind!r}")
