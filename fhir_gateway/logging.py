"""Logging: structlog configured once; console in dev, JSON in production; never PHI.

Log ids, counts, resource types, status codes and timings only: no names, MRNs, birth dates,
free text or payloads (STYLE.md §7).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog


class _GatewayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler configure_logging installs (so a second call replaces it)."""


class BoundLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib logger, whose debug and info lines below the level cost one level
    check: not the processor chain, whose first step (`filter_by_level`) would drop them by
    raising (the hot paths log two or three of those per request)."""

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.DEBUG):
            return None
        return super().debug(event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.INFO):
            return None
        return super().info(event, *args, **kw)


def configure_logging(
    fmt: Literal["console", "json"] = "json", level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Route structlog and the stdlib loggers (uvicorn, urllib3) to stderr (or `stream`, e.g.
    the demo's log file) in one format."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
    renderer: structlog.types.Processor = (
        # Plain tracebacks: rich's would print local variables, which can hold PHI.
        structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            # First: a line below the level costs one check, not the whole chain.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = _GatewayHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    # Replace our own handler only: others (a test runner's capture, a host's) stay.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _GatewayHandler)]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's access log carries query strings (which may hold identifiers): keep it off.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
