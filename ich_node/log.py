"""One structlog configuration for the node, its workers and the CLI.

JSON lines by default (what log shippers expect), a readable console renderer on
request. Standard-library loggers (pynetdicom, torch) are routed through the same
renderer. Callers log UIDs and counts only: never patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging
import sys

import structlog

_SHARED_PROCESSORS: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Configure structlog and the standard library logging for this process.

    Parameters
    ----------
    fmt
        ``json`` (one JSON object per line) or ``console``.
    level
        ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    """
    if fmt not in ("json", "console"):
        raise ValueError(f"fmt must be 'json' or 'console', got {fmt!r}")
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at DEBUG and dumps datasets (with PHI) at some levels:
    # keep it at WARNING unless the node itself is debugging.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
