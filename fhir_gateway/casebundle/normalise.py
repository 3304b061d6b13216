"""Normalise a case: everything stored for it -> one case bundle, stored as the JSON served.

`normalise_case()` reads the case's raw material (the referral's hosted resources, and the
`StoredResource` rows of each source: pulled FHIR records, ImagingStudy/Endpoint of the imaging
pull), maps each source with the pure mappers, assembles the bundle (`assemble_case_bundle`)
and replaces the case's `NormalisedResource` rows, `CaseBundleState` and `CaseView` (the
timeline, marker ranges, documents and studies the case page shows, `casebundle.derived`) in one
transaction (idempotent: re-running gives the same rows and ETag).

The `normalise_case` job is queued by every pull job at its end (`queue_after_pull`). When it runs
while another pull of the case is still queued or running, it does not build a half bundle: it
queues itself again a little later and ends, so it re-checks until every pull is done or dead
(a dead pull never queues a normalise, so waiting on it would lose the update; skipping would
too when the other pull then fails). The last pull to finish queues its own normalisation, which
builds at once; a re-check that finds the inputs unchanged since the last build (the mark kept
in `CaseBundleState.inputs_mark`) ends without building again: one build per change of inputs.
A pull whose handler has queued its normalisation counts as done (it has saved everything).

One build at a time per case (`CaseBuild`, claimed under the case's lock): a normalisation that
finds another one building marks it `rerun` and ends; the builder checks its inputs once more
before it lets go and builds again only if they changed. So two normalisations starting at the
same instant build once, and a change that arrives during a build gets exactly one more build.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Text, delete, func, insert, select, type_coerce, update
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.casebundle import derived, held
from fhir_gateway.casebundle.assemble import SourceBatch, assemble_case_bundle, iter_bundle_json
from fhir_gateway.casebundle.offline_map import with_source
from fhir_gateway.errors import InputError, NotFoundError
from fhir_gateway.intake import hosted
from fhir_gateway.jobs import JobContext
from fhir_gateway.resources import Resource, deterministic_id, json_compact, json_loads
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import (
    Base,
    Case,
    CaseBuild,
    CaseBundleState,
    CaseDocument,
    CaseView,
    FhirResource,
    HeldItem,
    Job,
    NormalisedResource,
    StoredResource,
    V2Message,
    utcnow,
)
from mappers import units
from mappers.fhir import InboundResource, check_resource, resources_to_normalised
from mappers.hl7v2 import document_to_resources as v2_to_resources

log = structlog.get_logger(__name__)

KIND = "normalise_case"
PULL_KINDS = ("pull_fhir", "pull_imaging")
V2_IN_CASE = ("matched", "assigned")  # HL7 v2 message states whose results enter the case
IMAGING_TYPES = frozenset({"ImagingStudy", "Endpoint"})
# Hosted resources a referral may point at without being the case's own (never another case's).
SHARED_TYPES = frozenset({"Organization", "Practitioner", "PractitionerRole", "Location"})
DEFER_MIN_S, DEFER_MAX_S = 1.0, 60.0
Issue = dict[str, Any]


@dataclass(frozen=True)
class Built:
    case_id: str
    etag: str
    resources: int
    issues: int
    sources: int
    missing: list[str]


# --------------------------------------------------------------------------- reading sources


def _instant(value: datetime) -> str:
    return hosted.fhir_instant(value)


def case_patient_id(case: Case) -> str:
    """The bundle's id and its Patient's id: the referral's hosted Patient when there is one."""
    if case.patient_ref.startswith("Patient/"):
        return case.patient_ref.split("/", 1)[1]
    return deterministic_id("case", case.id)


def referral_source(case: Case) -> str:
    return f"urn:fhir-gateway:referral:{case.partner_id}"


def _referral_batch(session: Session, case: Case) -> SourceBatch | None:
    rows = list(
        session.scalars(
            select(FhirResource)
            .where(FhirResource.case_id == case.id)
            .order_by(FhirResource.resource_type, FhirResource.id)
        )
    )
    seen = {(r.resource_type, r.id) for r in rows}
    frontier = list(rows)
    while frontier:  # shared resources the referral points at (its Organization, ...)
        row = frontier.pop()
        for ref in _references(row.body):
            rtype, _, rid = ref.partition("/")
            if rtype not in SHARED_TYPES or (rtype, rid) in seen:
                continue
            seen.add((rtype, rid))
            target = session.get(FhirResource, (rtype, rid))
            if target is not None and target.case_id is None:
                rows.append(target)
                frontier.append(target)
    out = held.excluded(session, case.id)  # a held study named by the referral stays out too
    rows = [r for r in rows if out.keeps_study(r.resource_type, r.body)]
    if not rows:
        return None
    items = [
        InboundResource(r.body, f"{r.resource_type}/{r.id}")
        for r in sorted(rows, key=lambda r: (r.resource_type != "Patient", r.resource_type, r.id))
    ]
    source = referral_source(case)
    received = _instant(max(r.last_updated for r in rows))
    return _batch(source, lambda: iter(items), "referral", f"Task/{case.task_id}", received)


def _references(node: Any) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref.count("/") == 1:
            out.append(ref)
        for value in node.values():
            if isinstance(value, dict | list):
                out += _references(value)
    elif isinstance(node, list):
        for item in node:
            out += _references(item)
    return out


def _stored_batches(session: Session, case_id: str) -> list[SourceBatch]:
    out = held.excluded(session, case_id)  # identity holds stay out until released
    t = StoredResource
    rows = session.execute(  # columns, not ORM objects: thousands of rows per case
        # The body as its JSON text: parsed only as the mapper takes it (`_parsed`), so a
        # source is held whole as dicts once (the mapper's output), not twice.
        select(t.source, t.resource_type, t.source_id, t.fetched_at, type_coerce(t.body, Text))
        .where(t.case_id == case_id)
        .order_by(t.source, t.resource_type, t.source_id)
    )
    by_source: dict[str, list[held.Stored]] = {}
    for source, rtype, source_id, fetched_at, text in rows:
        if out.reads_body(rtype) and not out.keeps(
            held.Stored(source, rtype, source_id, fetched_at, json_loads(text))
        ):
            continue
        by_source.setdefault(source, []).append(
            held.Stored(source, rtype, source_id, fetched_at, text)
        )
    documents = {
        f"{DOCUMENT_SOURCE}{d.id}": d
        for d in session.scalars(select(CaseDocument).where(CaseDocument.case_id == case_id))
    }
    batches = []
    while by_source:  # each source's rows let go of once mapped
        source, found = next(iter(by_source.items()))
        del by_source[source]
        # Patient first: the first Patient of the first source is the case Patient's base.
        found.sort(key=lambda r: r.resource_type != "Patient")
        items = _parsed(found)
        kind = "dicom" if all(r.resource_type in IMAGING_TYPES for r in found) else "fhir"
        received = _instant(max(r.fetched_at for r in found))
        doc = documents.get(source)
        if doc is None:
            batches.append(_batch(source, items, kind, source, received))
            continue
        # A document (records/documents.py): what was mapped from it has its DocumentReference
        # as the Provenance entity; a scanned PDF or an unreadable one is an issue of the case.
        docref = next((r for r in found if r.resource_type == "DocumentReference"), None)
        entity = (
            f"DocumentReference/{deterministic_id(source, 'DocumentReference', docref.source_id)}"
            if docref is not None
            else source
        )
        batch = _batch(source, items, doc.kind, entity, received)
        batch.issues += [with_source(i, source) for i in _document_issues(doc, entity)]
        batches.append(batch)
    return batches


def _parsed(found: list[held.Stored]) -> Callable[[], Iterator[InboundResource]]:
    """The stored rows (body as JSON text) as inbound resources, parsed one at a time."""
    return lambda: (
        InboundResource(json_loads(r.body), f"{r.resource_type}/{r.source_id}") for r in found
    )


def v2_source(row: V2Message) -> str:
    """The source name of a v2 sender's messages in the case bundle (ids derive from it): the
    MSH-4 facility (else MSH-3), hashed so no free text becomes part of a URI."""
    sender = (row.sending_facility or row.sending_application).split("^", 1)[0] or "unknown"
    return f"urn:fhir-gateway:v2:{hashlib.sha256(sender.encode()).hexdigest()[:16]}"


def _v2_batches(session: Session, case_id: str, settings: Settings) -> list[SourceBatch]:
    """HL7 v2 result messages matched or assigned to the case, one batch per message, mapped
    by `mappers.hl7v2`; a message whose PID the identity check holds stays out."""
    out = held.excluded(session, case_id)
    rows = session.scalars(
        select(V2Message)
        .where(V2Message.case_id == case_id, V2Message.state.in_(V2_IN_CASE))
        .order_by(V2Message.received_at, V2Message.id)
    )
    batches = []
    for row in rows:
        source = v2_source(row)
        try:
            partner = settings.partners.by_v2_facility(row.sending_facility)
            authorities = partner.v2_authorities if partner else None
            result = v2_to_resources(row.body, source, authorities)
        except InputError as exc:
            issue = {"severity": "error", "code": "invalid", "diagnostics": exc.message}
            batches.append(
                SourceBatch(source, [], [with_source(issue, f"v2:{row.id}")], "hl7v2", row.id)
            )
            continue
        patients = {r["id"] for r in result.resources if r["resourceType"] == "Patient"}
        if any((source, pid) in out.patients for pid in patients):
            continue
        issues = [with_source(i, f"v2:{row.id}") for i in result.issues]
        received = _instant(row.received_at)
        batches.append(SourceBatch(source, result.resources, issues, "hl7v2", row.id, received))
    return batches


DOCUMENT_SOURCE = "urn:fhir-gateway:document:"  # = records.documents.SOURCE_PREFIX


def _document_issues(doc: CaseDocument, where: str) -> list[Issue]:
    out: list[Issue] = []
    if doc.no_text_layer:
        out.append(
            {
                "severity": "warning",
                "code": "incomplete",
                "diagnostics": "no text (scanned): the PDF has no text layer; read it as an image",
                "expression": [where],
            }
        )
    if doc.status == "failed":
        out.append(
            {
                "severity": "error",
                "code": "processing",
                "diagnostics": f"document kept as received, not read: {doc.detail or 'unknown'}",
                "expression": [where],
            }
        )
    return out


def _batch(
    source: str,
    items: Callable[[], Iterator[InboundResource]],
    kind: str,
    document: str,
    received: str,
) -> SourceBatch:
    resources, issues = normalise_source(items, source)
    issues = [with_source(i, source) for i in issues]
    return SourceBatch(source, resources, issues, kind, document, received)


def normalise_source(
    items: Callable[[], Iterator[InboundResource]], source: str
) -> tuple[list[Resource], list[Issue]]:
    """Normalise one source's resources; a resource the mapper refuses is left out and reported
    (its raw row stays stored) instead of failing the whole case.

    `items` gives the resources afresh at each call: the mapper takes them one at a time and
    lets go of each once mapped, and the one-by-one retry after a refusal reads them again.

    Per-resource normalising gives the same ids as the batch: references of pulled resources are
    `Type/id`, which the mapper resolves to `deterministic_id(source, Type, id)` either way.
    """
    try:
        return resources_to_normalised(items(), source)
    except InputError:
        pass
    good: list[InboundResource] = []
    refused: list[Issue] = []
    for item in items():
        try:
            check_resource(item.resource, item.path)
            resources_to_normalised([item], source)
        except InputError as exc:
            refused.append(
                {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": f"resource not normalised: {exc.message}",
                    "expression": [item.path],
                }
            )
            continue
        good.append(item)
    resources, issues = resources_to_normalised(good, source)
    return resources, refused + issues


# --------------------------------------------------------------------------- building


def normalise_case(store: Store, settings: Settings, case_id: str) -> Built:
    """Build the case bundle from what is stored and replace the stored bundle (one transaction).

    The write checks that the case's inputs did not change while the bundle was being built
    (another pull saved, the Task moved); if they did, it builds again, so an older build never
    overwrites a newer one.

    Raises:
        NotFoundError: no such case. CaseClosedError: the case was cancelled or rejected.
    """
    started = time.monotonic()
    base_url = settings.base_url + "/fhir"
    for attempt in range(1, MAX_BUILDS + 1):
        # A read (one snapshot): mapping thousands of resources must not hold the write lock.
        with store.session(readonly=True) as s:
            case = s.get(Case, case_id)
            if case is None:
                raise NotFoundError(f"case {case_id} does not exist")
            seen = _inputs_mark(s, case_id)
            batches = [b for b in [_referral_batch(s, case)] if b is not None]
            batches += _stored_batches(s, case_id)
            batches += _v2_batches(s, case_id, settings)
            patient_id = case_patient_id(case)
        built = _build(case_id, patient_id, batches, base_url)
        with store.session() as s:
            jobs.require_case_open(s, case_id, "writing the case bundle")
            now = _inputs_mark(s, case_id)
            if now != seen and attempt < MAX_BUILDS:
                log.info("normalise.case.inputs_changed", case_id=case_id, attempt=attempt)
                continue
            built.state.inputs_mark = _mark_text(seen, base_url) if now == seen else None
            _write(s, built)
        break
    log.info(
        "normalise.case.done",
        case_id=case_id,
        sources=len(batches),
        resources=built.state.resource_count,
        issues=len(built.state.issues),
        elapsed_ms=round((time.monotonic() - started) * 1000),
    )
    state = built.state
    return Built(
        case_id,
        state.etag,
        state.resource_count,
        len(state.issues),
        len(batches),
        state.summary["missing"],
    )


MAX_BUILDS = 3


@dataclass
class _Result:
    state: CaseBundleState  # its etag set as the rows are written (`_write`)
    resources: list[Resource]
    view: CaseView


def _inputs_mark(session: Session, case_id: str) -> tuple[Any, ...]:
    """What changes whenever a case's inputs change (rows saved or updated)."""
    stored = session.execute(
        select(func.count(), func.max(StoredResource.fetched_at)).where(
            StoredResource.case_id == case_id
        )
    ).one()
    hosted_rows = session.execute(
        select(func.count(), func.max(FhirResource.last_updated)).where(
            FhirResource.case_id == case_id
        )
    ).one()
    holds = session.execute(
        select(func.count(), func.max(HeldItem.updated_at)).where(HeldItem.case_id == case_id)
    ).one()
    v2 = session.execute(
        select(func.count(), func.max(V2Message.decided_at)).where(
            V2Message.case_id == case_id, V2Message.state.in_(V2_IN_CASE)
        )
    ).one()
    return (*stored, *hosted_rows, *holds, *v2)


def _mark_text(mark: tuple[Any, ...], base_url: str) -> str:
    return json.dumps([*map(str, mark), base_url])


def inputs_unchanged(session: Session, case_id: str, base_url: str) -> bool:
    """Whether the stored bundle was built from the case's current inputs."""
    state = session.get(CaseBundleState, case_id)
    if state is None or state.inputs_mark is None:
        return False
    return state.inputs_mark == _mark_text(_inputs_mark(session, case_id), base_url)


def _build(case_id: str, patient_id: str, batches: list[SourceBatch], base_url: str) -> _Result:
    bundle = assemble_case_bundle(patient_id, batches, base_url=base_url)
    # What the case page and the timeline show, derived now from the resources at hand.
    view = derived.row(case_id, "", bundle.summary, enumerate(bundle.resources))
    counts: dict[str, int] = {}
    for r in bundle.resources:
        counts[r["resourceType"]] = counts.get(r["resourceType"], 0) + 1
    state = CaseBundleState(
        case_id=case_id,
        patient_id=patient_id,
        base_url=base_url,
        etag="",
        resource_count=len(bundle.resources),
        counts=counts,
        summary=bundle.summary,
        issues=bundle.issues,
        sources=[
            {"source": b.source, "kind": b.kind, "resources": len(b.resources)} for b in batches
        ],
    )
    return _Result(state, bundle.resources, view)


def _write(session: Session, built: _Result) -> None:
    """Replace the case's stored bundle rows and state (the caller's transaction).

    Each resource's JSON text is made as its rows are written, WRITE_CHUNK at a time, and the
    ETag (the digest of the Bundle as served) taken from the same text: the whole bundle is
    never held as text besides its resources."""
    state = built.state
    case_id = state.case_id
    session.execute(delete(NormalisedResource).where(NormalisedResource.case_id == case_id))
    pending: list[dict[str, Any]] = []

    def entries() -> Iterator[tuple[str, str, str]]:
        for n, r in enumerate(built.resources):
            body = _dumps(r)
            pending.append(
                {
                    "case_id": case_id,
                    "position": n,
                    "resource_type": r["resourceType"],
                    "resource_id": r["id"],
                    "body": body,
                }
            )
            yield r["resourceType"], r["id"], body

    digest = hashlib.sha256()
    for chunk in iter_bundle_json(state.patient_id, entries(), base_url=state.base_url):
        digest.update(chunk)
        if len(pending) >= WRITE_CHUNK:
            _insert(session, pending)
    _insert(session, pending)
    state.etag = built.view.etag = f'"{digest.hexdigest()[:40]}"'
    state.built_at = utcnow()
    session.merge(state)
    session.merge(built.view)  # same transaction: never a bundle with another build's view


def _insert(session: Session, rows: list[dict[str, Any]]) -> None:
    """Core executemany (no ORM bulk bookkeeping); `rows` emptied."""
    if rows:
        session.execute(insert(NORMALISED_TABLE), rows)
        rows.clear()


WRITE_CHUNK = 1000
NORMALISED_TABLE = Base.metadata.tables["normalised_resources"]


def _dumps(resource: Resource) -> str:
    return json_compact(resource)


# --------------------------------------------------------------------------- the job


def preload() -> None:
    """Load now what the mappers would load on the first normalisation (the unit factor
    table; ucumvert's registry is built only for a unit the table lacks): the service calls
    this at start, in a thread of its own."""
    units.preload()


def queue_after_pull(ctx: JobContext) -> None:
    """Queue the case's normalisation at the end of a pull job (its own transaction).

    Keyed by the pull job and attempt: a re-run of the same attempt queues nothing new.
    """
    if ctx.case_id is None:
        return
    key = f"normalise:{ctx.case_id}:{ctx.job_id}:{ctx.attempt}"
    with ctx.store.session() as s:
        jobs.enqueue(
            s, KIND, case_id=ctx.case_id, payload={"after": ctx.job_id, "key": key}, dedup_key=key
        )


def pending_pull(session: Session, case_id: str, after: str | None) -> Job | None:
    """A pull job of the case still to finish (not the one whose handler queued us: it has)."""
    stmt = select(Job).where(
        Job.case_id == case_id,
        Job.kind.in_(PULL_KINDS),
        Job.state.in_((jobs.QUEUED, jobs.RUNNING)),
    )
    if after:
        stmt = stmt.where(Job.id != after)
    for job in session.scalars(stmt.order_by(Job.run_at)):
        # A running pull whose handler has queued its normalisation has saved all it pulls.
        queued_key = f"normalise:{case_id}:{job.id}:{job.attempts}"
        if job.state == jobs.RUNNING and session.scalar(
            select(Job.id).where(Job.dedup_key == queued_key)
        ):
            continue
        return job
    return None


def run_normalise_case(ctx: JobContext) -> None:
    """Job `normalise_case`: rebuild the case bundle once no pull of the case is outstanding."""
    if ctx.case_id is None:
        raise InputError("normalise_case job needs a case")
    after = ctx.payload.get("after")
    base_url = ctx.settings.base_url + "/fhir"
    builder: str | None = None
    with ctx.store.session() as s:
        waiting = pending_pull(s, ctx.case_id, after)
        deferred = _defer(s, ctx, waiting) if waiting is not None else None
        if deferred is None:
            builder = _claim_build(s, ctx.case_id, ctx.job_id)
        unchanged = (
            deferred is None and builder is None and inputs_unchanged(s, ctx.case_id, base_url)
        )
    if deferred is not None:  # progress is its own transaction: after ours has committed
        ctx.progress({"deferred": deferred})
        return
    if builder is not None:  # it checks the inputs again before it ends: nothing is lost
        log.info("normalise.case.joined", case_id=ctx.case_id)
        ctx.progress({"normalise": {"joined": builder}})
        return
    built: Built | None = None
    try:
        while True:
            if unchanged:  # another normalisation already built from these very inputs
                log.info("normalise.case.unchanged", case_id=ctx.case_id)
            else:
                built = normalise_case(ctx.store, ctx.settings, ctx.case_id)
            with ctx.store.session() as s:
                if not _release_build(s, ctx.case_id, ctx.job_id):
                    break
                unchanged = inputs_unchanged(s, ctx.case_id, base_url)
    except BaseException:
        with ctx.store.session() as s:
            _drop_claim(s, ctx.case_id, ctx.job_id)
        raise
    if built is None:
        ctx.progress({"normalise": {"unchanged": True}})
        return
    _supersede_rechecks(ctx)
    ctx.progress(
        {
            "normalise": {
                "resources": built.resources,
                "issues": built.issues,
                "sources": built.sources,
                "missing": built.missing,
            }
        }
    )


def _claim_build(session: Session, case_id: str, job_id: str) -> str | None:
    """Claim the case's build for `job_id` (the caller's transaction, under the case's lock).

    Returns None when claimed; else the id of the job building, now marked to re-check."""
    jobs.require_case_open(session, case_id, "normalising")  # the lock serialises claimers
    claim = session.get(CaseBuild, case_id, populate_existing=True)
    if claim is not None and claim.job_id != job_id and _alive(session, claim.job_id):
        claim.rerun = True
        return claim.job_id
    if claim is None:
        session.add(CaseBuild(case_id=case_id, job_id=job_id, rerun=False, started_at=utcnow()))
    else:
        claim.job_id, claim.rerun, claim.started_at = job_id, False, utcnow()
    return None


def _alive(session: Session, job_id: str) -> bool:
    """Whether the job is running under a lease that has not expired (a crashed builder's
    claim lapses with its lease; the job is then taken over, or another claims the build)."""
    job = session.get(Job, job_id, populate_existing=True)
    return (
        job is not None
        and job.state == jobs.RUNNING
        and job.lease_expires_at is not None
        and job.lease_expires_at > utcnow()
    )


def _release_build(session: Session, case_id: str, job_id: str) -> bool:
    """Let go of the build; True (claim kept, flag cleared) when another normalisation asked
    for a re-check meanwhile."""
    jobs.require_case_open(session, case_id, "normalising")
    claim = session.get(CaseBuild, case_id, populate_existing=True)
    if claim is None or claim.job_id != job_id:
        return False
    if claim.rerun:
        claim.rerun = False
        return True
    session.delete(claim)
    return False


def _drop_claim(session: Session, case_id: str, job_id: str) -> None:
    session.execute(
        delete(CaseBuild).where(CaseBuild.case_id == case_id, CaseBuild.job_id == job_id)
    )


def _supersede_rechecks(ctx: JobContext) -> None:
    """Once a build has run with no pull outstanding, the re-checks queued by earlier
    normalisations (`_defer`) have nothing left to wait for: they end now, so the case does not
    show as stale until their timer fires. Only still-queued ones, in one conditional update."""
    assert ctx.case_id is not None
    with ctx.store.session() as s:
        if pending_pull(s, ctx.case_id, ctx.payload.get("after")) is not None:
            return
        rechecks = [
            job.id
            for job in s.scalars(
                select(Job).where(
                    Job.case_id == ctx.case_id,
                    Job.kind == KIND,
                    Job.state == jobs.QUEUED,
                    Job.id != ctx.job_id,
                )
            )
            if "defers" in (job.payload or {})
        ]
        if rechecks:
            s.execute(
                update(Job)
                .where(Job.id.in_(rechecks), Job.state == jobs.QUEUED)
                .values(state=jobs.DONE, finished_at=utcnow(), progress={"superseded": True})
            )
            log.info("normalise.case.rechecks_superseded", count=len(rechecks))


def _defer(session: Session, ctx: JobContext, waiting: Job) -> dict[str, Any]:
    """Queue this normalisation again for when the outstanding pull may be done."""
    now = utcnow()
    wait_s = (waiting.run_at - now).total_seconds() if waiting.state == jobs.QUEUED else 0.0
    delay = min(max(wait_s, DEFER_MIN_S), DEFER_MAX_S)
    defers = int(ctx.payload.get("defers", 0)) + 1
    base = str(ctx.payload.get("key") or f"normalise:{ctx.case_id}:{ctx.job_id}")
    jobs.enqueue(
        session,
        KIND,
        case_id=ctx.case_id,
        payload={**ctx.payload, "key": base, "defers": defers},
        dedup_key=f"{base}:d{defers}",
        run_at=now + timedelta(seconds=delay),
    )
    log.info("normalise.case.deferred", waiting_for=waiting.kind, delay_s=round(delay, 1))
    return {"waiting_for": waiting.kind, "delay_s": round(delay, 1)}


# --------------------------------------------------------------------------- state for the API


def bundle_state(
    session: Session, case_id: str, case_jobs: Sequence[Job] | None = None
) -> dict[str, Any]:
    """Normalisation state of a case for GET /cases/{id}: built or not, pending jobs, counts.

    `case_jobs`: the case's jobs when the caller has read them already (one query fewer on a
    page that is polled)."""
    state = session.get(CaseBundleState, case_id)
    if case_jobs is None:
        outstanding: Iterable[tuple[str, str]] = session.execute(
            select(Job.kind, Job.state).where(
                Job.case_id == case_id,
                Job.kind.in_((*PULL_KINDS, KIND)),
                Job.state.in_((jobs.QUEUED, jobs.RUNNING)),
            )
        ).all()
    else:
        outstanding = [
            (j.kind, j.state)
            for j in case_jobs
            if j.kind in (*PULL_KINDS, KIND) and j.state in (jobs.QUEUED, jobs.RUNNING)
        ]
    waiting = sorted({f"{kind} {st}" for kind, st in outstanding})
    if state is None:
        return {"state": "pending" if waiting else "not-started", "pending": waiting}
    return {
        "state": "stale" if waiting else "built",
        "pending": waiting,
        "built": _instant(state.built_at),
        "etag": state.etag,
        "resources": state.resource_count,
        "issues": len(state.issues or []),
        "missing": (state.summary or {}).get("missing", []),
    }


__all__ = [
    "Built",
    "bundle_state",
    "case_patient_id",
    "normalise_case",
    "normalise_source",
    "pending_pull",
    "queue_after_pull",
]
