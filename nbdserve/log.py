"""structlog set-up: JSON lines when stderr is not a terminal, a console renderer otherwise.

Per-connection fields are bound in contextvars by the connection handler before it starts any
request task (trio copies the context at spawn), so every line of a connection carries them.
Nothing on the per-request path logs above debug, and debug calls are guarded by a plain bool.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger

LogFormat = Literal["auto", "json", "console"]


def configure(*, verbose: bool = False, fmt: LogFormat = "auto",
              stream: TextIO | None = None) -> None:
    """Configure structlog for the process. Logs always go to stderr (stdout may be the NBD
    connection in ``--stdin`` mode)."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exc: list[Any] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        exc = []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *exc,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> FilteringBoundLogger:
    """A bound logger; bind once per object, not per request."""
    return cast(FilteringBoundLogger, structlog.get_logger("nbdserve", **initial))
