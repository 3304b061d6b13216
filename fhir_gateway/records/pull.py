"""Pull a patient's records from a referring EHR over FHIR, and store them for the case.

Plain functions a job can call: `pull_patient_records` (network: `$everything` when the server
offers it, else per-type searches in parallel, then attachments) and `save_pull` (database:
upsert `StoredResource` rows tagged with source and fetch time). Classification (staging, tumour
markers, ...) is the mappers' job, not the pull's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Text, func, insert, select, type_coerce, update
from sqlalchemy.orm import Session

from connectors._http import Http
from connectors.bulk import BulkExportClient, DoneFile, ExportProgress, ExportState, iter_resources
from connectors.fhir_client import FhirEhrClient, SearchResult
from fhir_gateway import jobs, metrics
from fhir_gateway.casebundle import held, normalise
from fhir_gateway.errors import (
    InputError,
    NotFoundError,
    UnknownPartnerError,
    UpstreamError,
    UpstreamNotFoundError,
    UpstreamRejectedError,
)
from fhir_gateway.jobs import JobContext
from fhir_gateway.records import documents
from fhir_gateway.records.partner_clients import session_for, token_provider_for
from fhir_gateway.resources import Resource, identifiers_of
from fhir_gateway.security import audit
from fhir_gateway.settings import Partner, Settings
from fhir_gateway.store import Store, models

log = structlog.get_logger(__name__)

# What a second opinion needs (STANDARDS.md §1.2/§1.3), Patient first.
KIND = "pull_fhir"
PULL_TYPES = (
    "Patient",
    "Condition",
    "DiagnosticReport",
    "Observation",
    "Specimen",
    "Procedure",
    "MedicationRequest",
    "MedicationAdministration",
    "ImagingStudy",
    "DocumentReference",
)
PAGE_SIZE = 200
SAVE_LOOKUP_IDS = 1000  # save_pull: up to this many ids, look up only those rows
BULK_BATCH = 500  # resources of an export file loaded (and marked loaded) per transaction
BULK_ISSUES_SHOWN = 20  # issues listed in the job's summary (all are counted)

ProgressCallback = Callable[[str, int, int], None]  # (resource type, resources so far, pages)
Checkpoint = Callable[[], None]  # raises CaseClosedError when the case was cancelled meanwhile
# Every type that moved since the last write, at once: {type: {"done": n, "pages": n}} (the job
# writes it as one progress transaction instead of one per type).
ProgressBatch = Callable[[dict[str, dict[str, int]]], None]
CHECK_EVERY_S = 0.2  # the case-closed check while pages arrive (save_pull checks it again)


@dataclass(frozen=True)
class PulledBinary:
    sha256: str
    size: int
    content_type: str
    resource: str  # "Type/id" of the resource whose attachment it is


@dataclass
class PullResult:
    source: str
    resources: list[Resource] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    partial_types: list[str] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)
    binaries: list[PulledBinary] = field(default_factory=list)
    used_everything: bool = False

    @property
    def partial(self) -> bool:
        return bool(self.partial_types)


@dataclass(frozen=True)
class SaveCounts:
    added: int
    updated: int
    unchanged: int
    fresh: bool = False  # nothing was stored from the source before: all it holds was saved now


def patient_id_of(patient_ref: str) -> str:
    """`Patient/123`, `https://ehr/fhir/Patient/123` or `123` -> `123`."""
    return patient_ref.rstrip("/").split("/")[-1]


def pull_patient_records(
    client: FhirEhrClient,
    patient_ref: str,
    *,
    since: str | None = None,
    max_parallel: int = 4,
    progress_cb: ProgressCallback | None = None,
    binary_dir: Path | None = None,
    types: Iterable[str] = PULL_TYPES,
    checkpoint: Checkpoint | None = None,
    progress_batch: ProgressBatch | None = None,
) -> PullResult:
    """Everything the EHR holds for the patient that a second opinion needs.

    `since` (a FHIR instant) restricts each search to `_lastUpdated=ge<since>` for re-pulls.
    `checkpoint` is called after the first page, then at most every `CHECK_EVERY_S` while pages
    arrive, and before every attachment; what it raises (the case was cancelled) ends the pull.
    `progress_batch`, when given, gets each progress write's types at once (not `progress_cb`).

    Raises:
        UpstreamUnavailableError: the server kept failing after retries (the job retries later).
        UpstreamRejectedError: refused, paging loop, bad responses (the job is dead, with reason).
    """
    started = time.monotonic()
    patient_id = patient_id_of(patient_ref)
    result = PullResult(source=client.base_url)
    searchable, everything = _server_offers(_capabilities(client))
    wanted = [t for t in dict.fromkeys(types) if not searchable or t in searchable]
    report = _Progress(progress_cb, checkpoint, progress_batch)
    if everything and since is None:
        result.used_everything = True
        found = SearchResult()
        for page in client.iter_everything(patient_id, wanted):
            # Keep what a second opinion needs; the rest of the compartment (claims, ...) is not.
            page.matches = [r for r in page.matches if r.get("resourceType") in wanted]
            found.add(page)
            report.by_type(found)
        _merge(result, "$everything", found)
    else:
        with ThreadPoolExecutor(max_workers=max(1, max_parallel)) as pool:
            stop = threading.Event()
            futures = {
                t: pool.submit(_search_type, client, t, patient_id, since, report, stop)
                for t in wanted
            }
            for resource_type, future in futures.items():
                try:
                    found = future.result()
                except UpstreamRejectedError as exc:
                    if exc.status != 403:
                        _cancel(futures.values())
                        raise
                    # SM-14: a type outside our authorisation is withheld, not a failed pull.
                    result.partial_types.append(resource_type)
                    result.issues.append(exc.to_issue())
                    continue
                except BaseException:
                    _cancel(futures.values())
                    raise
                _merge(result, resource_type, found)
    report.flush()
    if binary_dir is not None:
        _pull_attachments(client, result, binary_dir, checkpoint)
    result.counts = _count_types(result.resources)
    log.info(
        "pull.patient.done",
        types=len(result.counts),
        resources=len(result.resources),
        binaries=len(result.binaries),
        partial=result.partial,
        everything=result.used_everything,
        elapsed_ms=round((time.monotonic() - started) * 1000),
    )
    return result


def _capabilities(client: FhirEhrClient) -> Resource:
    """The CapabilityStatement, or {} when the server has none (then: search every type)."""
    try:
        found = client.capabilities()
    except UpstreamNotFoundError:
        found = {}
    if found.get("resourceType") != "CapabilityStatement":
        log.info("pull.capabilities.missing", got=found.get("resourceType"))
        return {}
    return found


def _cancel(futures: Iterable[Future[SearchResult]]) -> None:
    """One type failed: the pull fails, so do not start the searches still queued."""
    for future in futures:
        future.cancel()


def _server_offers(capabilities: Resource) -> tuple[set[str], bool]:
    """From the CapabilityStatement: types with search-type, and whether $everything is offered."""
    searchable: set[str] = set()
    everything = False
    for rest in capabilities.get("rest") or []:
        if rest.get("mode", "server") != "server":
            continue
        for entry in rest.get("resource") or []:
            codes = {i.get("code") for i in entry.get("interaction") or []}
            if "search-type" in codes:
                searchable.add(str(entry.get("type")))
            if entry.get("type") == "Patient" and any(
                op.get("name") in ("everything", "patient-everything")
                or str(op.get("definition", "")).endswith("Patient-everything")
                for op in entry.get("operation") or []
            ):
                everything = True
    return searchable, everything


def _search_type(
    client: FhirEhrClient,
    resource_type: str,
    patient_id: str,
    since: str | None,
    report: _Progress,
    stop: threading.Event,
) -> SearchResult:
    """All pages of one type; once any type has failed, the searches not yet begun are skipped."""
    if stop.is_set():
        return SearchResult()
    try:
        return _search_pages(client, resource_type, patient_id, since, report)
    except UpstreamRejectedError as exc:
        if exc.status != 403:
            stop.set()
        raise
    except BaseException:
        stop.set()
        raise


def _search_pages(
    client: FhirEhrClient,
    resource_type: str,
    patient_id: str,
    since: str | None,
    report: _Progress,
) -> SearchResult:
    params: dict[str, str] = {"_count": str(PAGE_SIZE)}
    if resource_type == "Patient":
        params["_id"] = patient_id
    else:
        params["patient"] = f"Patient/{patient_id}"
    if since is not None:
        params["_lastUpdated"] = f"ge{since}"
    started = time.monotonic()
    result = SearchResult()
    for page in client.iter_pages(resource_type, params):
        result.add(page)
        report(result, resource_type)
    log.info(
        "pull.type.done",
        resource_type=resource_type,
        count=len(result.resources),
        pages=result.pages,
        partial=result.partial,
        elapsed_ms=round((time.monotonic() - started) * 1000),
    )
    return result


PROGRESS_EVERY_S = 0.5  # at most one progress write per this, plus the final one


class _Progress:
    """Per-type progress at a bounded rate: the latest counts are kept and handed to the
    callback (a database write per type) at most every `PROGRESS_EVERY_S`, and at `flush()`.
    A mixed-type search ($everything) is counted page by page, not recounted whole."""

    def __init__(
        self,
        callback: ProgressCallback | None,
        checkpoint: Checkpoint | None,
        batch: ProgressBatch | None = None,
    ) -> None:
        self._callback = callback
        self._batch = batch
        self._checkpoint = checkpoint
        self._checked: float | None = None  # when the checkpoint last ran
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[int, int]] = {}
        self._dirty: set[str] = set()
        self._last = time.monotonic()
        self._counted = 0  # resources of the mixed-type search already counted
        self._by_type: dict[str, int] = {}

    def _check(self) -> None:
        """The case-closed check, at most every CHECK_EVERY_S (a read transaction each)."""
        if self._checkpoint is None:
            return
        now = time.monotonic()
        with self._lock:
            if self._checked is not None and now - self._checked < CHECK_EVERY_S:
                return
            self._checked = now
        self._checkpoint()

    def __call__(self, result: SearchResult, label: str) -> None:
        self._check()
        with self._lock:
            self._note(label, len(result.resources), result.pages)
        self._maybe_flush()

    def by_type(self, result: SearchResult) -> None:
        """Progress of a mixed-type search ($everything): the new page's resources counted."""
        self._check()
        with self._lock:
            for resource in result.resources[self._counted :]:
                rtype = resource["resourceType"]
                self._by_type[rtype] = self._by_type.get(rtype, 0) + 1
                self._note(rtype, self._by_type[rtype], result.pages)
            self._counted = len(result.resources)
        self._maybe_flush()

    def _note(self, label: str, done: int, pages: int) -> None:
        self._latest[label] = (done, pages)
        self._dirty.add(label)

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last >= PROGRESS_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self._batch is not None:
            with self._lock:
                self._last = time.monotonic()
                moved = {
                    label: {"done": self._latest[label][0], "pages": self._latest[label][1]}
                    for label in sorted(self._dirty)
                }
                self._dirty.clear()
                if moved:
                    self._batch(moved)
            return
        if self._callback is None:
            return
        with self._lock:
            self._last = time.monotonic()
            for label in sorted(self._dirty):
                self._callback(label, *self._latest[label])
            self._dirty.clear()


def _merge(result: PullResult, label: str, found: SearchResult) -> None:
    seen = {(r["resourceType"], r.get("id")) for r in result.resources}
    for resource in found.resources:
        key = (resource["resourceType"], resource.get("id"))
        if key not in seen:
            seen.add(key)
            result.resources.append(resource)
    result.issues += found.issues
    if found.partial:
        result.partial_types.append(label)


def _count_types(resources: Iterable[Resource]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in resources:
        counts[r["resourceType"]] = counts.get(r["resourceType"], 0) + 1
    return counts


# --- attachments --------------------------------------------------------------------------


def _attachments(resource: Resource) -> Iterator[dict[str, Any]]:
    if resource["resourceType"] == "DocumentReference":
        for content in resource.get("content") or []:
            if isinstance(content.get("attachment"), dict):
                yield content["attachment"]
    elif resource["resourceType"] == "DiagnosticReport":
        yield from (a for a in resource.get("presentedForm") or [] if isinstance(a, dict))
    elif resource["resourceType"] == "Media" and isinstance(resource.get("content"), dict):
        yield resource["content"]


def _pull_attachments(
    client: FhirEhrClient,
    result: PullResult,
    binary_dir: Path,
    checkpoint: Checkpoint | None = None,
) -> None:
    """Inline data decoded, same-server URLs downloaded; both stored by SHA-256."""
    for resource in result.resources:
        where = f"{resource['resourceType']}/{resource.get('id')}"
        for attachment in _attachments(resource):
            if checkpoint is not None:
                checkpoint()
            content_type = str(attachment.get("contentType") or "application/octet-stream")
            try:
                if attachment.get("data"):
                    pulled = _store_inline(str(attachment["data"]), content_type, binary_dir)
                elif attachment.get("url"):
                    got = client.fetch_binary(str(attachment["url"]), binary_dir, content_type)
                    pulled = (got.sha256, got.size, got.content_type)
                else:
                    continue
            except UpstreamError as exc:
                if isinstance(exc, UpstreamRejectedError) and exc.status in (None, 403, 404, 410):
                    result.issues.append(
                        {
                            "severity": "warning",
                            "code": "incomplete",
                            "diagnostics": f"attachment of {where} not fetched: {exc.message}",
                        }
                    )
                    continue
                raise
            result.binaries.append(PulledBinary(*pulled, resource=where))


def _store_inline(data: str, content_type: str, binary_dir: Path) -> tuple[str, int, str]:
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise UpstreamRejectedError("attachment data is not base64", system="fhir") from exc
    sha = hashlib.sha256(raw).hexdigest()
    binary_dir.mkdir(parents=True, exist_ok=True)
    final = binary_dir / sha
    if not final.exists():
        fd, tmp = tempfile.mkstemp(dir=binary_dir, prefix=".part-")
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
        os.replace(tmp, final)
    return sha, len(raw), content_type


# --- storing ------------------------------------------------------------------------------


SAVE_CHUNK = 500  # rows per INSERT executemany
STORED_TABLE = models.Base.metadata.tables["stored_resources"]  # Core: no ORM bulk-insert copies


def save_pull(
    store: Store,
    case_id: str,
    source: str,
    result: PullResult,
    *,
    also: Callable[[Session], None] | None = None,
) -> SaveCounts:
    """Upsert the pulled resources as `StoredResource` rows (one per source id) and binaries.

    Re-pulls only add or update: nothing stored earlier is removed. Idempotent. `also` runs in
    the same transaction (a bulk load marks how far it got, so a resumed job skips it).

    Raises:
        CaseClosedError: the case was cancelled or rejected (checked under the case's lock, in
            the transaction that would write: nothing is written).
    """
    now = datetime.now(UTC)
    table = models.StoredResource
    new_rows: dict[tuple[str, str], dict[str, Any]] = {}
    changed: list[dict[str, Any]] = []
    same: list[int] = []
    with store.session() as session:
        jobs.require_case_open(session, case_id, "saving pulled records")
        query = select(
            table.id, table.resource_type, table.source_id, type_coerce(table.body, Text)
        ).where(table.case_id == case_id, table.source == source)
        ids = {str(r.get("id")) for r in result.resources}
        batch = len(ids) <= SAVE_LOOKUP_IDS  # a batch: look up only its ids
        if batch:
            query = query.where(table.source_id.in_(ids))
        existing = {(rtype, sid): (rid, text) for rid, rtype, sid, text in session.execute(query)}
        # `fresh`: nothing stored from this source before (a batch's lookup sees only its ids)
        fresh = not existing and (
            not batch
            or session.scalar(
                select(table.id).where(table.case_id == case_id, table.source == source).limit(1)
            )
            is None
        )
        for resource in result.resources:
            key = (resource["resourceType"], str(resource.get("id")))
            last_updated = (resource.get("meta") or {}).get("lastUpdated")
            found = existing.get(key)
            if found is None:
                new_rows[key] = {  # the last of a repeated id wins, as before
                    "case_id": case_id,
                    "source": source,
                    "resource_type": key[0],
                    "source_id": key[1],
                    "fetched_at": now,
                    "last_updated": last_updated,
                    "body": resource,
                }
            elif found[1] is None or json.loads(found[1]) != resource:
                changed.append(
                    {
                        "id": found[0],
                        "body": resource,
                        "last_updated": last_updated,
                        "fetched_at": now,
                    }
                )
            else:
                same.append(found[0])
        # One statement per kind of write (executemany), not one ORM object per resource.
        rows = list(new_rows.values())
        for i in range(0, len(rows), SAVE_CHUNK):  # Core executemany, in chunks (bounded memory)
            session.execute(insert(STORED_TABLE), rows[i : i + SAVE_CHUNK])
        if changed:
            session.execute(update(table), changed)
        for i in range(0, len(same), 500):
            session.execute(
                update(table).where(table.id.in_(same[i : i + 500])).values(fetched_at=now)
            )
        added, updated, unchanged = len(new_rows), len(changed), len(same)
        shas = {b.sha256: b for b in result.binaries}
        known = set(
            session.scalars(select(models.Binary.sha256).where(models.Binary.sha256.in_(shas)))
        )
        for sha, binary in shas.items():
            if sha not in known:
                session.add(
                    models.Binary(sha256=sha, size=binary.size, content_type=binary.content_type)
                )
        audit.record(
            session,
            "records.pull",
            audit.SYSTEM,
            case_id=case_id,
            patient=audit.patient_of_case(session, case_id),
            entity=[f"source:{source}", f"count:{len(result.resources)}"],
        )
        if also is not None:
            also(session)
    log.info("pull.save.done", added=added, updated=updated, unchanged=unchanged)
    return SaveCounts(added, updated, unchanged, fresh=fresh)


def last_updated_since(store: Store, case_id: str, source: str) -> str | None:
    """The newest source `meta.lastUpdated` stored for the case: the `since` of a re-pull."""
    with store.session() as session:
        value: str | None = session.scalar(
            select(func.max(models.StoredResource.last_updated)).where(
                models.StoredResource.case_id == case_id,
                models.StoredResource.source == source,
            )
        )
    return value


# --- the job ------------------------------------------------------------------------------


def client_for(partner: Partner, system: str | None = None) -> FhirEhrClient:
    """A FhirEhrClient for a partner's FHIR endpoint, with its auth (SMART, bearer, basic)."""
    return clients_for(partner, system)[0]


def clients_for(
    partner: Partner, system: str | None = None
) -> tuple[FhirEhrClient, BulkExportClient | None]:
    """The partner's FhirEhrClient and, when its endpoint has `bulk` set, a BulkExportClient
    sharing its session and token (a Group-level export also asks for `Group` read)."""
    endpoint = partner.fhir
    if endpoint is None:
        raise InputError(f"partner {partner.id} has no FHIR endpoint to pull from")
    http = Http(
        session_for(endpoint), system=system or f"fhir:{partner.id}", timeout_s=endpoint.timeout_s
    )
    types = (*PULL_TYPES, "Binary", *(("Group",) if endpoint.bulk_group else ()))
    tokens = token_provider_for(endpoint, resource_types=types)
    client = FhirEhrClient(http, endpoint.base_url, tokens=tokens)
    if endpoint.bulk is None:
        return client, None
    bulk = BulkExportClient(
        http, endpoint.base_url, tokens=tokens, poll_min_s=endpoint.bulk_poll_min_s
    )
    return client, bulk


def source_patient_id(client: FhirEhrClient, store: Store, case: models.Case) -> str:
    """The patient's id in the referring EHR, from the referral's subject.

    An absolute reference on the EHR's base gives the id; `identifier:system|value` and the
    identifiers of the Patient the partner sent us are searched in the EHR (one match needed);
    otherwise the referral's own `Patient/<id>` is taken to be the EHR's id.

    Raises:
        InputError: an identifier search found no patient or several.
    """
    ref = case.patient_ref
    if ref.startswith(client.base_url + "/Patient/"):
        return patient_id_of(ref)
    tokens: list[str] = []
    if ref.startswith("identifier:"):
        tokens.append(ref.removeprefix("identifier:"))
    elif ref.startswith("Patient/"):
        with store.session() as session:
            hosted = session.get(models.FhirResource, ("Patient", patient_id_of(ref)))
            body = hosted.body if hosted is not None else {}
        tokens += [f"{s}|{v}" for s, v in identifiers_of(body) if s]
    for token in tokens:
        found = client.search("Patient", {"identifier": token}, post=True).resources
        if len(found) == 1:
            return str(found[0]["id"])
        if len(found) > 1:
            raise InputError(f"{len(found)} patients in the source EHR match the referral")
    if ref.startswith("identifier:"):
        raise InputError("no patient in the source EHR matches the referral's identifier")
    return patient_id_of(ref)


def pull_case(
    store: Store,
    settings: Settings,
    case_id: str,
    *,
    partner: Partner | None = None,
    refresh: bool = False,
    progress_cb: ProgressCallback | None = None,
    checkpoint: Checkpoint | None = None,
    tracker: BulkTracker | None = None,
    progress_batch: ProgressBatch | None = None,
) -> tuple[PullResult, SaveCounts]:
    """Pull the case's patient from its partner's EHR and store it (the job and the CLI's
    `fhir-gateway pull CASE_ID [--refresh]` share this). The partner defaults to the case's.

    `refresh`: a re-pull of what changed since the newest `meta.lastUpdated` already stored
    (Bulk export: since the last completed export's `transactionTime`). `tracker` keeps a Bulk
    export's state between attempts (the job's progress); without one it lives in memory.

    Raises:
        NotFoundError: no such case. UnknownPartnerError: its partner is not configured.
    """
    with store.session() as session:
        case = session.get(models.Case, case_id)
    if case is None:
        raise NotFoundError(f"case {case_id} does not exist")
    partner = partner or settings.partners.by_id(case.partner_id)
    if partner is None:
        raise UnknownPartnerError(f"partner {case.partner_id} is not in the partners file")
    client, bulk = clients_for(partner)
    patient_id = source_patient_id(client, store, case)
    if bulk is not None:
        return pull_case_bulk(
            store,
            settings,
            case_id,
            client,
            bulk,
            patient_id,
            group_id=partner.fhir.bulk_group if partner.fhir else None,
            refresh=refresh,
            progress_cb=progress_cb,
            checkpoint=checkpoint,
            tracker=tracker or BulkTracker(),
        )
    since = last_updated_since(store, case_id, client.base_url) if refresh else None
    endpoint = partner.fhir
    result = pull_patient_records(
        client,
        f"Patient/{patient_id}",
        since=since,
        max_parallel=endpoint.max_parallel if endpoint else 4,
        progress_cb=progress_cb,
        binary_dir=settings.data_dir / "binaries",
        checkpoint=checkpoint,
        progress_batch=progress_batch,
    )
    if checkpoint is not None:
        checkpoint()
    saved = save_pull(store, case_id, client.base_url, result)
    metrics.observe_pull(
        resources=len(result.resources),
        kind="records",
        size=sum(b.size for b in result.binaries),
    )
    # Right patient: the pulled Patient(s) and records about other patients against the referral.
    held.check_records(
        store,
        case_id,
        client.base_url,
        patient_id,
        result.resources if saved.fresh else None,  # a first pull: what was stored is in hand
    )
    # Every attachment is read by its content: documents of the case, checked the same way.
    documents.read_in_pulled(
        store,
        settings.data_dir,
        settings.base_url,
        case_id,
        client.base_url,
        [(b.sha256, b.content_type, b.resource) for b in result.binaries],
        result.resources,
    )
    return result, saved


def run_pull_fhir(ctx: JobContext) -> None:
    """Job `pull_fhir`: pull the case's records from its partner's EHR; progress per type.

    Idempotent (upserts by source id). Retryable failures propagate as UpstreamUnavailableError.
    """
    if ctx.case_id is None or ctx.partner is None:
        raise InputError("pull_fhir job needs a case with a partner")

    def progress(resource_type: str, done: int, pages: int) -> None:
        ctx.progress({resource_type: {"done": done, "pages": pages}})

    result, saved = pull_case(
        ctx.store,
        ctx.settings,
        ctx.case_id,
        partner=ctx.partner,
        refresh=bool(ctx.payload.get("refresh")),
        progress_cb=progress,
        progress_batch=ctx.progress,  # one write per progress tick, every type in it
        checkpoint=lambda: ctx.checkpoint("pulling records"),
        tracker=BulkTracker(
            ctx.stored_progress().get("bulk"),
            write=lambda doc: ctx.progress({"bulk": doc}),
            write_in=lambda session, doc: ctx.progress_in(session, {"bulk": doc}),
        ),
    )
    ctx.progress(
        {
            "summary": {
                "counts": result.counts,
                "binaries": len(result.binaries),
                "partial_types": result.partial_types,
                "issues": result.issues[:BULK_ISSUES_SHOWN],
                "issue_count": len(result.issues),
                "added": saved.added,
                "updated": saved.updated,
                "unchanged": saved.unchanged,
            }
        }
    )
    normalise.queue_after_pull(ctx)


# --- Bulk Data $export (partners with `bulk` set) ------------------------------------------


class BulkTracker:
    """A Bulk export's resumable state and visible progress: one JSON document (`bulk` in the
    job's progress) holding the client's `ExportState`, how many lines of each output file are
    loaded, the latest `X-Progress`, and the counts. `write` commits it on its own; `write_in`
    inside the caller's transaction (a loaded batch and its mark commit together). Without
    either (the CLI) it lives in memory only."""

    def __init__(
        self,
        saved: dict[str, Any] | None = None,
        *,
        write: Callable[[dict[str, Any]], None] | None = None,
        write_in: Callable[[Session, dict[str, Any]], None] | None = None,
    ) -> None:
        self.doc: dict[str, Any] = dict(saved or {})
        self._write = write
        self._write_in = write_in

    def begin(self, source: str, request: dict[str, Any]) -> ExportState:
        """The saved export if it is the same request to the same source, else a fresh one."""
        if self.doc.get("source") != source or self.doc.get("request") != request:
            self.doc = {"source": source, "request": request, "loaded": {}}
        return ExportState.from_json(self.doc.get("state") or {})

    def loaded(self, url: str) -> int:
        """Lines of the file at `url` already loaded (-1: the whole file)."""
        return int((self.doc.get("loaded") or {}).get(url, 0))

    def mark_loaded(self, url: str, lines: int, session: Session | None = None) -> None:
        self.doc.setdefault("loaded", {})[url] = lines
        if session is not None and self._write_in is not None:
            self._write_in(session, self.doc)

    def save(self, state: ExportState | None = None, **fields: Any) -> None:
        if state is not None:
            self.doc["state"] = state.to_json()
            if state.manifest is not None:
                listed = sum(len(state.manifest.get(k) or []) for k in ("output", "error"))
                self.doc["files"] = {"downloaded": len(state.done), "total": listed}
        self.doc.update(fields)
        if self._write is not None:
            self._write(self.doc)


def last_export_since(store: Store, case_id: str, source: str) -> str | None:
    """The `transactionTime` of the case's last completed export from `source` (`_since`)."""
    with store.session(readonly=True) as session:
        done = session.scalars(
            select(models.Job)
            .where(
                models.Job.case_id == case_id,
                models.Job.kind == KIND,
                models.Job.state == jobs.DONE,
            )
            .order_by(models.Job.finished_at.desc())
        )
        for job in done:
            bulk = (job.progress or {}).get("bulk") or {}
            if bulk.get("source") == source and bulk.get("transaction_time"):
                return str(bulk["transaction_time"])
    return None


def of_patient(resource: Resource, patient_id: str, base_url: str) -> bool:
    """Is `resource` the patient's, by what it says itself? The Patient with that id, or a
    resource whose `subject`/`patient`/`beneficiary` is `Patient/<id>` (relative or on the
    source's base). Anything else (other patients, no patient reference) is not kept."""
    if resource.get("resourceType") == "Patient":
        return str(resource.get("id")) == patient_id
    wanted = f"Patient/{patient_id}"
    for name in ("subject", "patient", "beneficiary"):
        value = resource.get(name)
        ref = value.get("reference") if isinstance(value, dict) else None
        if isinstance(ref, str) and ref.removeprefix(base_url + "/") == wanted:
            return True
    return False


def pull_case_bulk(
    store: Store,
    settings: Settings,
    case_id: str,
    client: FhirEhrClient,
    bulk: BulkExportClient,
    patient_id: str,
    *,
    group_id: str | None,
    refresh: bool,
    tracker: BulkTracker,
    progress_cb: ProgressCallback | None = None,
    checkpoint: Checkpoint | None = None,
) -> tuple[PullResult, SaveCounts]:
    """The case's records through Bulk Data `$export` (STANDARDS BD-01..BD-08).

    Patient-level: `POST Patient/$export` with `patient=Patient/<id>`; Group-level:
    `Group/<id>/$export`. `_type` is the pull's types; `_since` (with `refresh`) the last
    completed export's `transactionTime`. Each NDJSON file is streamed to disk, then loaded in
    batches exactly as search results are (the same rows, attachments and documents); each
    batch commits together with how far the file is loaded, so a resumed job neither kicks off
    again, nor downloads a finished file again, nor loads a line twice. Only the patient's
    resources are kept (`of_patient`). The error file's OperationOutcomes become the pull's
    issues. The export is DELETEd and its files removed once loaded.
    """
    started = time.monotonic()
    source = client.base_url
    since = last_export_since(store, case_id, source) if refresh else None
    request = {"group": group_id, "types": list(PULL_TYPES), "since": since}
    state = tracker.begin(source, request)
    dest = settings.data_dir / "bulk" / case_id / hashlib.sha256(source.encode()).hexdigest()[:16]
    result = PullResult(source=source)
    totals = SaveCounts(0, 0, 0)
    counts: dict[str, int] = dict(tracker.doc.get("counts") or {})
    skipped = int(tracker.doc.get("not_this_patient") or 0)
    binary_dir = settings.data_dir / "binaries"

    def on_poll(p: ExportProgress) -> None:
        if checkpoint is not None:
            checkpoint()
        tracker.save(status="in-progress", x_progress=p.progress, polls=p.polls)

    def load(done: DoneFile) -> None:
        nonlocal totals, skipped
        start = tracker.loaded(done.url)
        if done.kind != "output" or start < 0:
            return
        lines = itertools.islice(_numbered(Path(done.path)), start, None)
        while batch := list(itertools.islice(lines, BULK_BATCH)):
            if checkpoint is not None:
                checkpoint()
            upto = batch[-1][0]
            mine = [r for _, r in batch if of_patient(r, patient_id, source)]
            skipped += len(batch) - len(mine)
            part = PullResult(source=source, resources=mine)
            _pull_attachments(client, part, binary_dir, checkpoint)
            documents.read_in_pulled(
                store,
                settings.data_dir,
                settings.base_url,
                case_id,
                source,
                [(b.sha256, b.content_type, b.resource) for b in part.binaries],
                part.resources,
            )
            for r in mine:
                counts[r["resourceType"]] = counts.get(r["resourceType"], 0) + 1
            tracker.doc.update(counts=counts, not_this_patient=skipped)
            saved = save_pull(
                store, case_id, source, part, also=partial(tracker.mark_loaded, done.url, upto)
            )
            tracker.mark_loaded(done.url, upto)  # (the CLI's in-memory tracker)
            totals = SaveCounts(
                totals.added + saved.added,
                totals.updated + saved.updated,
                totals.unchanged + saved.unchanged,
            )
            result.issues += part.issues
            result.binaries += part.binaries
            if progress_cb is not None:
                progress_cb(done.type, counts.get(done.type, 0), 0)
        tracker.mark_loaded(done.url, -1)
        tracker.save(status="loading", counts=counts)
        Path(done.path).unlink(missing_ok=True)

    tracker.save(state, status="exporting")
    exported = bulk.export(
        dest,
        group_id=group_id,
        types=PULL_TYPES,
        since=since,
        patients=() if group_id else (f"Patient/{patient_id}",),
        state=state,
        save=tracker.save,
        on_progress=on_poll,
        on_file=load,
    )
    for done in exported.files:  # done before an interruption, not yet loaded
        if Path(done.path).exists():
            load(done)
    for outcome in exported.errors:
        for issue in outcome.get("issue") or []:
            if isinstance(issue, dict):
                result.issues.append({**issue, "diagnostics": _export_issue(issue)})
    if exported.error_files:
        result.partial_types.append("$export")
    shutil.rmtree(dest, ignore_errors=True)
    tracker.save(
        status="done",
        transaction_time=exported.transaction_time,
        counts=counts,
        errors=len(exported.errors),
    )
    result.counts = counts
    if checkpoint is not None:
        checkpoint()
    metrics.observe_pull(
        resources=sum(counts.values()), kind="records", size=sum(b.size for b in result.binaries)
    )
    held.check_records(store, case_id, source, patient_id)
    log.info(
        "pull.bulk.done",
        types=len(counts),
        resources=sum(counts.values()),
        not_this_patient=skipped,
        errors=len(exported.errors),
        elapsed_ms=round((time.monotonic() - started) * 1000),
    )
    return result, totals


def _numbered(path: Path) -> Iterator[tuple[int, Resource]]:
    """The file's resources with the count of resources read so far (1, 2, ...)."""
    yield from enumerate(iter_resources(path), start=1)


def _export_issue(issue: dict[str, Any]) -> str:
    text = str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")
    return f"$export error file: {text}"[:500]
