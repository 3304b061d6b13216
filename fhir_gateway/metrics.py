"""Prometheus metrics (the official `prometheus_client`): what the operator watches.

Counters and histograms live in one module registry (`REGISTRY`) and are observed where the work
happens: job durations in `jobs.Worker`, pulled bytes/resources/instances in `records.pull` and
`imaging.retrieval`, deliveries in `reports.delivery`, HTTP requests in the access middleware
(`api/observe.py`). Job counts by kind and state, the queue depth and the oldest queued job's age
are read from the database at scrape time (`JobsCollector`), so they are right whichever process
ran the jobs. Counters of a separate `fhir-gateway worker` process live in that process.

`serve --processes N` (N > 1) runs prometheus_client's multiprocess mode: `serve` points
`PROMETHEUS_MULTIPROC_DIR` at an empty directory under the data dir before it starts the
processes, each process writes its counters and histograms there, and a scrape answered by any
of them sums every process's values (`MultiProcessCollector`).

Labels carry no identifiers: kinds, states, outcomes, route templates and status codes only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from fhir_gateway.store import Store
from fhir_gateway.store.models import Job, utcnow

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NAMESPACE = "fhir_gateway"
REGISTRY = CollectorRegistry(auto_describe=True)

JOB_DURATION = Histogram(
    "job_duration_seconds",
    "Time a job's handler ran, by kind and outcome (done, failed).",
    ["kind", "outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
PULL_BYTES = Counter(
    "pull_bytes",
    "Bytes pulled from partners: kind=records (FHIR attachments), kind=images (DICOM).",
    ["kind"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PULL_RESOURCES = Counter(
    "pull_resources",
    "FHIR resources pulled from partner EHRs.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PULL_INSTANCES = Counter(
    "pull_instances",
    "DICOM instances pulled from partner PACS and stored.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "deliveries",
    "Report delivery attempts by outcome: delivered, retry (will be retried), dead.",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "http_requests",
    "HTTP requests by method, route template (never the raw path) and status.",
    ["method", "route", "status"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency (until the last byte of the response) by method and route template.",
    ["method", "route"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class JobsCollector(Collector):
    """Job gauges read from the database when Prometheus scrapes."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = utcnow()
        with self._store.session() as s:
            counts = s.execute(
                select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
            )
            by_kind_state = [(str(k), str(st), int(n)) for k, st, n in counts]
            due = s.scalar(select(func.count()).where(Job.state == "queued", Job.run_at <= now))
            oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state == "queued"))
        jobs = GaugeMetricFamily(
            f"{NAMESPACE}_jobs", "Jobs in the database by kind and state.", labels=["kind", "state"]
        )
        for kind, state, n in by_kind_state:
            jobs.add_metric([kind, state], n)
        yield jobs
        yield GaugeMetricFamily(
            f"{NAMESPACE}_queue_depth",
            "Queued jobs that are due now (waiting for a worker; backing-off jobs not counted).",
            value=int(due or 0),
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_queue_oldest_age_seconds",
            "Age of the oldest queued job (since it was enqueued); 0 when the queue is empty.",
            value=_age_s(oldest, now),
        )


def _age_s(then: datetime | None, now: datetime) -> float:
    return max(0.0, (now - then).total_seconds()) if then is not None else 0.0


def render(store: Store) -> bytes:
    """The text exposition of the module registry plus the job gauges from `store`."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(JobsCollector(store))
    counters = REGISTRY
    if os.environ.get(MULTIPROC_ENV):  # several serve processes: every process's values
        counters = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(counters)  # type: ignore[no-untyped-call]
    return generate_latest(counters) + generate_latest(scrape)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def observe_pull(*, resources: int = 0, instances: int = 0, kind: str, size: int) -> None:
    """Count what a pull fetched (records: resources + attachment bytes; images: instances)."""
    if resources:
        PULL_RESOURCES.inc(resources)
    if instances:
        PULL_INSTANCES.inc(instances)
    if size:
        PULL_BYTES.labels(kind=kind).inc(size)
