"""Job handlers used by the queue tests (loaded into worker processes through
FHIR_GATEWAY_JOBS__EXTRA_MODULES). Each run leaves a marker file, so tests can count runs."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from fhir_gateway.jobs import JobContext, job_handler


def _mark(ctx: JobContext, what: str) -> None:
    marker_dir = Path(ctx.payload["marker_dir"])
    (marker_dir / f"{ctx.job_id}.{what}.{os.getpid()}.{uuid.uuid4().hex[:6]}").touch()


@job_handler("test.sleep")
def sleep_then_mark(ctx: JobContext) -> None:
    """Mark the start, sleep, mark completion: a SIGKILL in between leaves only a start mark."""
    _mark(ctx, "start")
    time.sleep(float(ctx.payload.get("seconds", 0)))
    _mark(ctx, "done")


@job_handler("test.count")
def count(ctx: JobContext) -> None:
    _mark(ctx, "done")
