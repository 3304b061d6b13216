"""Log lines below the configured level are dropped before any processing; those at or above
it are written as before."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

from fhir_gateway.logging import configure_logging


def test_below_the_level_nothing_is_processed_at_or_above_it_is_written() -> None:
    out = io.StringIO()
    calls: list[str] = []
    try:
        configure_logging("json", "WARNING", stream=out)
        processors = structlog.get_config()["processors"]
        structlog.configure(processors=[_spy(calls), *processors])
        log = structlog.get_logger("fhir_gateway.test")
        log.debug("test.debug.dropped", n=1)
        log.info("test.info.dropped", n=2)
        log.warning("test.warning.kept", n=3)
        assert calls == ["test.warning.kept"]  # the chain ran for the kept line only
        logging.getLogger().setLevel("INFO")  # a level changed at run time is honoured
        log.info("test.info.kept", n=4)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [(r["event"], r["level"]) for r in lines] == [
            ("test.warning.kept", "warning"),
            ("test.info.kept", "info"),
        ]
    finally:
        configure_logging("console", "INFO")


def _spy(calls: list[str]) -> structlog.types.Processor:
    def spy(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        calls.append(str(event["event"]))
        return event

    return spy
