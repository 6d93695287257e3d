"""Driver registry: one line per driver, as ``"module:Class"`` so that a module that is
missing or fails to import breaks only its own driver."""

from __future__ import annotations

import importlib

from ..driver import Driver
from ..errors import GraphError

__all__ = ["DRIVERS", "load_driver"]

DRIVERS: dict[str, str] = {
    "file": "nbdserve.block.drivers.file:FileDriver",
    "qcow2": "nbdserve.block.qcow2:Qcow2Driver",
    "raw": "nbdserve.block.drivers.raw:RawDriver",
    "memory": "nbdserve.block.drivers.memory:MemoryDriver",
    "null": "nbdserve.block.drivers.null:NullDriver",
    "null-co": "nbdserve.block.drivers.null:NullDriver",  # qemu's name
    "blkdebug": "nbdserve.block.drivers.blkdebug:BlkdebugDriver",
}

_loaded: dict[str, type[Driver]] = {}


def load_driver(name: str) -> type[Driver]:
    """The driver class registered as ``name``; GraphError if unknown or broken."""
    cls = _loaded.get(name)
    if cls is not None:
        return cls
    target = DRIVERS.get(name)
    if target is None:
        raise GraphError(f"unknown driver '{name}' (known: {', '.join(sorted(DRIVERS))})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except Exception as exc:
        raise GraphError(f"driver '{name}' is unavailable: {exc!r}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise GraphError(f"driver '{name}': {target} is not a Driver subclass")
    _loaded[name] = cls
    return cls
