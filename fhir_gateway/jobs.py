"""Durable job queue in the gateway's database (transactional outbox), leased workers, retries.

A job is written by `enqueue()` inside the caller's transaction, so a state change and the work it
causes commit together or not at all. Workers claim due jobs with a lease (PostgreSQL:
`FOR UPDATE SKIP LOCKED`; SQLite: `BEGIN IMMEDIATE` serialises claimers). A worker that dies
leaves its lease to expire; another worker then takes the job over. Completion and failure are
fenced by the lease owner, so a worker whose lease was taken over cannot overwrite the new
owner's result.

Failures retry with exponential backoff and full jitter, honouring a `retry_after` the handler
reports (`UpstreamError.retry_after`, e.g. from `Retry-After`); `InputError` and
`UpstreamRejectedError` are permanent and make the job `dead` at once; after `max_attempts` the
job is `dead` with its last error visible.

A case whose referral Task is cancelled or rejected is closed: `cancel_case_jobs` moves its
queued jobs to `cancelled` in the transaction that closes it, and a running handler stops at its
next `ctx.checkpoint()` (or at `require_case_open` inside the transaction that would write),
raising `CaseClosedError`, which the worker records as `cancelled` without retry.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import event, insert, or_, select, update
from sqlalchemy.orm import Session

from fhir_gateway.errors import (
    CaseClosedError,
    ConflictError,
    GatewayError,
    InputError,
    NotFoundError,
    UpstreamError,
    UpstreamRejectedError,
)
from fhir_gateway.metrics import JOB_DURATION
from fhir_gateway.resources import new_id
from fhir_gateway.settings import JobSettings, Partner, Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Base, Case, Job, utcnow
from fhir_gateway.store.prebuilt import Prebuilt

log = structlog.get_logger(__name__)

QUEUED, RUNNING, DONE, DEAD = "queued", "running", "done", "dead"
CANCELLED = "cancelled"  # its case was closed (Task cancelled or rejected); never retried
CLOSED_CASE_STATUSES = frozenset({"cancelled", "rejected"})


def require_case_open(session: Session, case_id: str, doing: str, *, lock: bool = True) -> Case:
    """The case, if its Task is not cancelled or rejected. With `lock` the case row is locked
    (PostgreSQL `FOR UPDATE`; SQLite serialises writers at BEGIN IMMEDIATE) so a cancellation
    cannot commit between this check and the caller's writes.

    Raises:
        NotFoundError: no such case. CaseClosedError: the case is cancelled or rejected.
    """
    stmt = select(Case).where(Case.id == case_id)
    if lock and session.bind is not None and session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    case = session.scalar(stmt.execution_options(populate_existing=True))
    if case is None:
        raise NotFoundError(f"case {case_id} does not exist")
    if case.status in CLOSED_CASE_STATUSES:
        raise CaseClosedError(case_id, case.status, doing)
    return case


def cancel_case_jobs(session: Session, case_id: str, reason: str) -> int:
    """Cancel the case's queued jobs in the caller's transaction (the case is being closed).
    Running jobs stop at their next checkpoint. Returns how many were cancelled."""
    result = session.execute(
        update(Job)
        .where(Job.case_id == case_id, Job.state == QUEUED)
        .values(
            state=CANCELLED,
            last_error=reason[:4000],
            finished_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    count = int(getattr(result, "rowcount", 0) or 0)
    log.info("job.case.cancelled", case_id=case_id, jobs=count)
    return count


@dataclass
class JobContext:
    """What a handler gets: the job's identity and payload, and the service's store and settings."""

    job_id: str
    kind: str
    case_id: str | None
    payload: dict[str, Any]
    attempt: int
    store: Store
    settings: Settings
    partner: Partner | None
    _progress: Callable[[dict[str, Any]], None] = field(repr=False)
    lease_owner: str | None = None  # the worker holding the lease (fences progress writes)

    def stored_progress(self) -> dict[str, Any]:
        """The job's progress as committed (what an earlier, interrupted attempt left)."""
        with self.store.session(readonly=True) as s:
            job = s.get(Job, self.job_id)
            return dict(job.progress or {}) if job is not None else {}

    def progress_in(self, session: Session, update_: dict[str, Any]) -> None:
        """Merge `update_` into the job's progress inside the caller's transaction, so it
        commits with the work it describes (e.g. "this file is loaded" with its rows). Fenced:
        a worker whose lease was taken over writes nothing."""
        job = session.get(Job, self.job_id)
        if job is not None and (self.lease_owner is None or job.lease_owner == self.lease_owner):
            job.progress = {**(job.progress or {}), **update_}

    def progress(self, update_: dict[str, Any]) -> None:
        """Merge `update_` into the job's progress and commit it at once (shown in the case).

        It is its own transaction: call it outside any open `store.session()` (on SQLite a
        second writer inside an open write transaction waits for itself)."""
        self._progress(update_)

    def checkpoint(self, doing: str = "more work") -> None:
        """Stop here if the job's case was closed (Task cancelled or rejected) meanwhile.

        Its own short read transaction: call it outside any open `store.session()`.

        Raises:
            CaseClosedError: the case is cancelled or rejected (the job ends `cancelled`).
        """
        if self.case_id is None:
            return
        with self.store.session(readonly=True) as s:  # a read: no write lock to wait for
            require_case_open(s, self.case_id, doing, lock=False)


Handler = Callable[[JobContext], None]
_HANDLERS: dict[str, Handler] = {}


def register_handler(kind: str, fn: Handler) -> None:
    """Make `fn` the handler of jobs of `kind` (the service's: `fhir_gateway.job_handlers`)."""
    _HANDLERS[kind] = fn


def job_handler(kind: str) -> Callable[[Handler], Handler]:
    """Decorator form of `register_handler` (for handlers outside the service, e.g. tests)."""

    def register(fn: Handler) -> Handler:
        register_handler(kind, fn)
        return fn

    return register


def enqueue(
    session: Session,
    kind: str,
    *,
    case_id: str | None = None,
    payload: dict[str, Any] | None = None,
    dedup_key: str | None = None,
    max_attempts: int = 8,
    run_at: datetime | None = None,
) -> Job:
    """Add a job in the caller's transaction. With `dedup_key`, an existing job is returned."""
    if dedup_key is not None:
        existing = session.scalar(select(Job).where(Job.dedup_key == dedup_key))
        if existing is not None:
            return existing
    job = Job(
        id=new_id(),
        kind=kind,
        case_id=case_id,
        payload=payload or {},
        dedup_key=dedup_key,
        state=QUEUED,
        attempts=0,
        max_attempts=max_attempts,
        run_at=run_at or utcnow(),
        progress={},
    )
    session.add(job)
    session.flush()
    _wake_on_commit(session)
    return job


def _wake_on_commit(session: Session) -> None:
    """Wake this process's workers when `session` commits (`_after_commit`). A flag, not a
    listener per session: `event.listen` on each session cost more than the enqueue's insert."""
    session.info["wakes_workers"] = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop("wakes_workers", False):
        _wake_workers()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop("wakes_workers", None)  # nothing was queued


# Workers of this process wait on this between polls: a job committed here starts at once
# instead of at the next poll (`jobs.poll_s`); other processes still find it by polling.
_WAKE = threading.Condition()
_wakes = [0]


def _wake_workers(_session: Session | None = None) -> None:
    with _WAKE:
        _wakes[0] += 1
        _WAKE.notify_all()


def enqueue_for_new_case(session: Session, case_id: str, kinds: Iterable[str]) -> list[str]:
    """Queue `kinds` for a case created in the caller's transaction, in one bulk insert: the
    case is new, so no job of it can exist and no dedup lookup is needed (the dedup keys are
    the ones `enqueue` would use, `<kind>:<case id>`). Returns the kinds queued."""
    now = utcnow()
    rows: list[dict[str, Any]] = [
        {
            "id": new_id(),
            "kind": kind,
            "case_id": case_id,
            "payload": {},
            "dedup_key": f"{kind}:{case_id}",
            "state": QUEUED,
            "attempts": 0,
            "max_attempts": 8,
            "run_at": now,
            "progress": {},
            "created_at": now,
            "updated_at": now,
        }
        for kind in kinds
    ]
    if rows:
        # PostgreSQL: sent with the transaction's next read or its COMMIT (`store.prebuilt`)
        _INSERT_JOB.insert(session.connection(), rows, later=True)
        _wake_on_commit(session)
    return [str(r["kind"]) for r in rows]


_NEW_JOB_KEYS = (
    "id",
    "kind",
    "case_id",
    "payload",
    "dedup_key",
    "state",
    "attempts",
    "max_attempts",
    "run_at",
    "progress",
    "created_at",
    "updated_at",
)
_INSERT_JOB = Prebuilt(insert(Base.metadata.tables["jobs"]), _NEW_JOB_KEYS)


def requeue_dead(session: Session, job_id: str) -> Job:
    """Put a dead job back in the queue with fresh attempts (admin).

    Raises:
        NotFoundError: unknown job. ConflictError: the job is not dead.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"job {job_id} is not known")
    if job.state != DEAD:
        raise ConflictError(f"job {job_id} is {job.state}, not dead")
    job.state, job.attempts, job.run_at, job.finished_at = QUEUED, 0, utcnow(), None
    return job


def backoff_s(attempt: int, cfg: JobSettings, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    ceiling = min(cfg.backoff_cap_s, cfg.backoff_base_s * (2 ** max(attempt - 1, 0)))
    return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True)
class Claimed:
    id: str
    kind: str
    case_id: str | None
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    lease_owner: str


class Queue:
    """Claim, complete and fail jobs of the given kinds on a store."""

    def __init__(self, store: Store, cfg: JobSettings) -> None:
        self.store = store
        self.cfg = cfg

    def claim(self, owner: str, kinds: Iterable[str]) -> Claimed | None:
        """Lease one due job (queued and due, or running with an expired lease), or None."""
        kinds = list(kinds)
        if not kinds:
            return None
        now = utcnow()
        with self.store.session() as s:
            due = or_(
                (Job.state == QUEUED) & (Job.run_at <= now),
                (Job.state == RUNNING) & (Job.lease_expires_at < now),
            )
            stmt = select(Job).where(due, Job.kind.in_(kinds)).order_by(Job.run_at).limit(1)
            if self.store.is_postgres:
                stmt = stmt.with_for_update(skip_locked=True)
            job = s.scalar(stmt)
            if job is None:
                return None
            if job.state == RUNNING:
                log.warning(
                    "job.lease.expired",
                    job_id=job.id,
                    kind=job.kind,
                    previous_owner=job.lease_owner,
                )
            job.state = RUNNING
            job.attempts += 1
            job.lease_owner = owner
            job.lease_expires_at = now + timedelta(seconds=self.cfg.lease_s)
            return Claimed(
                job.id,
                job.kind,
                job.case_id,
                dict(job.payload or {}),
                job.attempts,
                job.max_attempts,
                owner,
            )

    def _fenced(self, claimed: Claimed, **values: Any) -> bool:
        with self.store.session() as s:
            result = s.execute(
                update(Job)
                .where(
                    Job.id == claimed.id,
                    Job.lease_owner == claimed.lease_owner,
                    Job.state == RUNNING,
                )
                .values(**values, updated_at=utcnow())
            )
            return bool(getattr(result, "rowcount", 0))

    def heartbeat(self, claimed: Claimed) -> bool:
        expires = utcnow() + timedelta(seconds=self.cfg.lease_s)
        return self._fenced(claimed, lease_expires_at=expires)

    def complete(self, claimed: Claimed) -> bool:
        now = utcnow()
        return self._fenced(
            claimed,
            state=DONE,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            last_error=None,
        )

    def fail(
        self, claimed: Claimed, error: str, *, permanent: bool, retry_after: float | None = None
    ) -> str:
        """Record a failure: requeue with backoff, or dead. Returns the new state."""
        now = utcnow()
        if permanent or claimed.attempt >= claimed.max_attempts:
            self._fenced(
                claimed,
                state=DEAD,
                finished_at=now,
                last_error=error[:4000],
                lease_owner=None,
                lease_expires_at=None,
            )
            return DEAD
        delay = max(backoff_s(claimed.attempt, self.cfg), retry_after or 0.0)
        self._fenced(
            claimed,
            state=QUEUED,
            run_at=now + timedelta(seconds=delay),
            last_error=error[:4000],
            lease_owner=None,
            lease_expires_at=None,
        )
        return QUEUED

    def cancel(self, claimed: Claimed, reason: str) -> bool:
        """The job's case was closed while it ran: `cancelled`, never retried."""
        return self._fenced(
            claimed,
            state=CANCELLED,
            finished_at=utcnow(),
            last_error=reason[:4000],
            lease_owner=None,
            lease_expires_at=None,
        )

    def merge_progress(self, claimed: Claimed, update_: dict[str, Any]) -> None:
        with self.store.session() as s:
            job = s.get(Job, claimed.id)
            if job is not None and job.lease_owner == claimed.lease_owner:
                job.progress = {**(job.progress or {}), **update_}

    def requeue(self, job_id: str) -> bool:
        """Put a dead (or done) job back in the queue with fresh attempts (operator action)."""
        with self.store.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.state not in (DEAD, DONE):
                return False
            job.state, job.attempts, job.run_at, job.finished_at = QUEUED, 0, utcnow(), None
            return True


class Worker:
    """Runs handlers for claimed jobs until stopped. Several may run, in threads or processes."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        name: str | None = None,
        kinds: Iterable[str] | None = None,
    ) -> None:
        self.store = store
        self.kinds = tuple(kinds) if kinds is not None else None  # None: every registered kind
        self.settings = settings
        self.queue = Queue(store, settings.jobs)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def stop(self) -> None:
        self._stop.set()
        _wake_workers()

    def run_forever(self) -> None:
        log.info("worker.start", worker=self.name, kinds=sorted(_HANDLERS))
        while not self._stop.is_set():
            seen = _wakes[0]
            try:
                ran = self.run_once()
            except Exception:  # the loop must survive a database hiccup
                log.exception("worker.loop.error", worker=self.name)
                ran = False
            if not ran:
                with _WAKE:  # until the next poll, or a job enqueued by this process
                    if seen == _wakes[0] and not self._stop.is_set():
                        _WAKE.wait(self.settings.jobs.poll_s)
        log.info("worker.stop", worker=self.name)

    def run_once(self) -> bool:
        """Claim and run one job; False when nothing was due."""
        claimed = self.queue.claim(self.name, self.kinds if self.kinds is not None else _HANDLERS)
        if claimed is None:
            return False
        self._run(claimed)
        return True

    def _run(self, claimed: Claimed) -> None:
        handler = _HANDLERS[claimed.kind]
        ctx = JobContext(
            job_id=claimed.id,
            kind=claimed.kind,
            case_id=claimed.case_id,
            payload=claimed.payload,
            attempt=claimed.attempt,
            store=self.store,
            settings=self.settings,
            partner=self._partner_of(claimed.case_id),
            _progress=lambda u: self.queue.merge_progress(claimed, u),
            lease_owner=claimed.lease_owner,
        )
        beat = _Heartbeat(self.queue, claimed, self.settings.jobs.lease_s / 3)
        started = time.monotonic()
        cpu_started = time.thread_time()  # this thread's CPU (helper threads not counted)
        structlog.contextvars.bind_contextvars(job_id=claimed.id, case_id=claimed.case_id)
        try:
            beat.start()
            ctx.checkpoint(f"job {claimed.kind}")  # a closed case's leftover (e.g. lease expired)
            handler(ctx)
        except CaseClosedError as exc:
            self.queue.cancel(claimed, _describe(exc))
            log.info("job.run.cancelled", kind=claimed.kind, attempt=claimed.attempt)
        except Exception as exc:
            # Rejected input is final; a remote failure or a settings problem the operator can
            # fix is retried with backoff (honouring the remote's Retry-After).
            permanent = isinstance(exc, InputError | UpstreamRejectedError)
            retry_after = exc.retry_after if isinstance(exc, UpstreamError) else None
            JOB_DURATION.labels(kind=claimed.kind, outcome="failed").observe(
                time.monotonic() - started
            )
            state = self.queue.fail(
                claimed, _describe(exc), permanent=permanent, retry_after=retry_after
            )
            ours = isinstance(exc, GatewayError)  # expected: no traceback in the log
            (log.warning if ours else log.exception)(
                "job.run.failed" if ours else "job.run.error",
                kind=claimed.kind,
                attempt=claimed.attempt,
                state=state,
                error=type(exc).__name__,
            )
        else:
            JOB_DURATION.labels(kind=claimed.kind, outcome="done").observe(
                time.monotonic() - started
            )
            if self.queue.complete(claimed):
                log.info(
                    "job.run.done",
                    kind=claimed.kind,
                    attempt=claimed.attempt,
                    elapsed_ms=round((time.monotonic() - started) * 1000),
                    cpu_ms=round((time.thread_time() - cpu_started) * 1000),
                )
            else:
                log.warning("job.run.lease_lost", kind=claimed.kind)
        finally:
            beat.stop()
            structlog.contextvars.unbind_contextvars("job_id", "case_id")

    def _partner_of(self, case_id: str | None) -> Partner | None:
        if case_id is None:
            return None
        with self.store.session() as s:
            case = s.get(Case, case_id)
            partner_id = case.partner_id if case else None
        return self.settings.partners.by_id(partner_id) if partner_id else None


class _Heartbeat:
    """Extends a job's lease while its handler runs, so long jobs are not taken over."""

    def __init__(self, queue: Queue, claimed: Claimed, every_s: float) -> None:
        self._queue, self._claimed, self._every = queue, claimed, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-heartbeat")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._queue.heartbeat(self._claimed)
            except Exception:
                log.warning("job.heartbeat.error", job_id=self._claimed.id)


def _describe(exc: BaseException) -> str:
    """Error text kept on the job: the class and our message (our messages carry no PHI)."""
    return f"{type(exc).__name__}: {exc}"


def start_worker_threads(store: Store, settings: Settings, count: int) -> list[Worker]:
    """Start `count` workers in daemon threads; call `.stop()` on each to end them."""
    workers = [Worker(store, settings) for _ in range(count)]
    for w in workers:
        w.thread = threading.Thread(target=w.run_forever, daemon=True, name=f"worker-{w.name}")
        w.thread.start()
    return workers


def stop_workers(workers: list[Worker], timeout_s: float = 30.0) -> None:
    """Ask workers to stop and wait for their current job to finish."""
    for w in workers:
        w.stop()
    for w in workers:
        if w.thread is not None:
            w.thread.join(timeout_s)


__all__ = [
    "CANCELLED",
    "CLOSED_CASE_STATUSES",
    "DEAD",
    "DONE",
    "QUEUED",
    "RUNNING",
    "Claimed",
    "JobContext",
    "Queue",
    "Worker",
    "cancel_case_jobs",
    "enqueue",
    "job_handler",
    "register_handler",
    "require_case_open",
    "start_worker_threads",
    "stop_workers",
]
