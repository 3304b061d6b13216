"""Imaging pull for a case: which studies (referral + QIDO by patient), fetch them over WADO-RS
into the image store, describe them as ImagingStudy.

`pull_case_images()` is a plain function (CLI, tests and benchmarks call it). It imports only
what retrieval needs, so a process that pulls images stays small; the `pull_imaging` job, which
wires it to the case's partner and settings (and the DIMSE bridge), is `fhir_gateway.imaging.job`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from sqlalchemy import select

from connectors.dicomweb import (
    STUDY_UID,
    DicomwebClient,
    RejectedPart,
    Retrieved,
    RetrievedInstance,
    first_value,
)
from fhir_gateway import metrics
from fhir_gateway.casebundle import held
from fhir_gateway.imaging.store import ImageStore, InstanceRef, read_dataset
from fhir_gateway.resources import DICOM_UID, Resource
from fhir_gateway.store.db import Store
from fhir_gateway.store.models import Case, FhirResource
from mappers.dicom import IMAGING_STUDY_KEYWORDS, datasets_to_imaging_studies, json_to_dataset

if TYPE_CHECKING:
    from fhir_gateway.settings import DicomwebEndpoint

log = structlog.get_logger(__name__)

ACSN = "ACSN"  # v2-0203 identifier type: accession number
CHECK_EVERY_S = 0.2  # the case-closed check while instances stream in
ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class StudySelector:
    """One way of naming studies to pull: a Study Instance UID, an accession number, or a
    patient id (QIDO by PatientID + IssuerOfPatientID)."""

    study_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None


@dataclass
class PullCounts:
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    skipped: int = 0  # already in the case before this pull
    rejected: list[dict[str, str]] = field(default_factory=list)  # sop_uid/series_uid + reason
    held: int = 0  # studies held by the identity check (casebundle.held)

    def as_progress(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "instances": self.instances,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "rejected": len(self.rejected),
            "held": self.held,
        }


# --- which studies ----------------------------------------------------------------------


def study_selectors_for_case(
    store: Store, case_id: str, dicomweb: DicomwebEndpoint | None
) -> list[StudySelector]:
    """Studies named by the referral's ServiceRequest (supportingInfo ImagingStudy identifiers,
    accession numbers) plus the patient's id when the partner allows searching by patient."""
    with store.session() as s:
        case = s.get(Case, case_id)
        if case is None:
            return []
        rows = list(s.scalars(select(FhirResource).where(FhirResource.case_id == case_id)))
    by_ref = {f"{r.resource_type}/{r.id}": r.body for r in rows}
    sr = by_ref.get(f"ServiceRequest/{case.service_request_id}") or {}
    contained = {f"#{c.get('id')}": c for c in sr.get("contained") or [] if isinstance(c, dict)}
    out: list[StudySelector] = []
    for info in sr.get("supportingInfo") or []:
        if not isinstance(info, dict):
            continue
        ref = str(info.get("reference") or "")
        target = contained.get(ref) or by_ref.get(ref)
        is_study = (target or {}).get("resourceType") == "ImagingStudy" or (
            target is None and (info.get("type") == "ImagingStudy" or "ImagingStudy/" in ref)
        )
        if not is_study:
            continue
        idents = [info["identifier"]] if isinstance(info.get("identifier"), dict) else []
        if target is not None:
            idents += [i for i in target.get("identifier") or [] if isinstance(i, dict)]
        out += [sel for sel in map(_selector_of_identifier, idents) if sel is not None]
    for ident in sr.get("identifier") or []:
        if _is_accession(ident):
            out.append(StudySelector(accession_number=str(ident["value"])))
    if dicomweb is not None and dicomweb.search_by_patient:
        patient = by_ref.get(case.patient_ref) or {}
        pid = _patient_id(patient, dicomweb.issuer_of_patient_id)
        if pid:
            out.append(
                StudySelector(patient_id=pid, issuer_of_patient_id=dicomweb.issuer_of_patient_id)
            )
    return list(dict.fromkeys(out))


def _selector_of_identifier(ident: dict[str, Any]) -> StudySelector | None:
    value = str(ident.get("value") or "")
    if not value:
        return None
    if ident.get("system") == DICOM_UID:
        return StudySelector(study_uid=value.removeprefix("urn:oid:"))
    if _is_accession(ident):
        return StudySelector(accession_number=value)
    return None


def _is_accession(ident: Any) -> bool:
    if not isinstance(ident, dict) or not ident.get("value"):
        return False
    codings = ((ident.get("type") or {}).get("coding")) or []
    return any(isinstance(c, dict) and c.get("code") == ACSN for c in codings)


def _patient_id(patient: Resource, issuer: str | None) -> str | None:
    idents = [i for i in patient.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    if issuer:
        for i in idents:
            if i.get("system") in (issuer, f"urn:oid:{issuer}"):
                return str(i["value"])
    for i in idents:
        codes = [c.get("code") for c in (i.get("type") or {}).get("coding") or []]
        if "MR" in codes:
            return str(i["value"])
    return str(idents[0]["value"]) if idents else None


def resolve_studies(client: DicomwebClient, selectors: Iterable[StudySelector]) -> list[str]:
    """Study Instance UIDs matching the selectors, each once, in order (QIDO-RS)."""
    uids: list[str] = []
    for sel in selectors:
        found = client.search_studies(
            study_uid=sel.study_uid,
            accession_number=sel.accession_number,
            patient_id=sel.patient_id,
            issuer_of_patient_id=sel.issuer_of_patient_id,
        )
        uids += [first_value(study, STUDY_UID) for study in found]
    return [u for u in dict.fromkeys(uids) if u]


# --- the pull -----------------------------------------------------------------------------


def pull_case_images(
    store: Store,
    case_id: str,
    client: DicomwebClient,
    image_store: ImageStore,
    study_selectors: Iterable[StudySelector],
    progress_cb: ProgressCallback | None = None,
    *,
    checkpoint: Callable[[], None] | None = None,
    progress_every_s: float = 1.0,
    batch_size: int = 256,
    flush_every_s: float = 1.0,
    issuer_of_patient_id: str | None = None,
) -> PullCounts:
    """Fetch every selected study into `image_store` for the case; idempotent and resumable.

    Instances already held are skipped (per series; per instance when a series is partly held).
    Index rows are written `batch_size` at a time, or every `flush_every_s` (one transaction
    each), by one fetching thread while the others go on streaming.
    A part that is not valid DICOM is rejected with its reason; the others are kept.
    `checkpoint` is called before each study, every `CHECK_EVERY_S` while instances arrive and
    before each index write;
    what it raises (the case was cancelled) ends the pull, and nothing more is indexed.
    Then every selected study's Patient module is compared with the referral's patient
    (`casebundle.held.check_studies`, issuer from the partners file): a study that is not a
    match is held out of the per-case DICOMweb and the bundle until an admin releases it.

    Raises:
        UpstreamUnavailableError: the source failed (the job retries; what was fetched stays).
    """
    counts = PullCounts()
    started = time.monotonic()
    last_report = [0.0]
    lock = threading.Lock()  # pending, counts
    index_lock = threading.Lock()  # one index transaction at a time
    pending: list[RetrievedInstance] = []
    last_flush = [time.monotonic()]

    def report(force: bool = False) -> None:
        now = time.monotonic()
        if progress_cb is not None and (force or now - last_report[0] >= progress_every_s):
            last_report[0] = now
            with lock:
                progress = counts.as_progress()
            progress_cb({"imaging": progress})

    def flush(force: bool = False) -> None:
        """Index what has arrived: a batch, or whatever is pending after `flush_every_s`.
        Called by the fetching threads; only one indexes at a time, the others stream on."""
        with lock:
            due = time.monotonic() - last_flush[0] >= flush_every_s
            if not pending or not (force or due or len(pending) >= batch_size):
                return
            batch = pending[:]
            pending.clear()
            last_flush[0] = time.monotonic()
        with index_lock:
            if checkpoint is not None:
                checkpoint()
            image_store.add_batch(case_id, batch, client.base_url)
            size = sum(p.size for p in batch)
            with lock:
                counts.instances += len(batch)
                counts.bytes += size
            metrics.observe_pull(instances=len(batch), kind="images", size=size)
            report()

    last_check = [time.monotonic()]

    def sink(result: Retrieved) -> None:
        # A cancelled case stops the pull within CHECK_EVERY_S (not a query per instance); the
        # index write checks it again under the case's lock, so nothing more is indexed.
        if checkpoint is not None and time.monotonic() - last_check[0] >= CHECK_EVERY_S:
            last_check[0] = time.monotonic()
            checkpoint()
        with lock:
            if isinstance(result, RejectedPart):
                counts.rejected.append(
                    {
                        "sop_uid": result.sop_uid,
                        "series_uid": result.series_uid,
                        "reason": result.reason,
                    }
                )
                return
            pending.append(result)
        flush()

    study_uids = resolve_studies(client, study_selectors)
    counts.studies = len(study_uids)
    with image_store.staging() as staging:
        try:
            for study_uid in study_uids:
                if checkpoint is not None:
                    checkpoint()
                already = image_store.held_sop_uids(case_id, study_uid)
                counts.skipped += len(already)
                plans = client.plan_study(study_uid, already)
                client.pull_plans(plans, staging, sink)
        finally:
            flush(force=True)  # what arrived before a failure is kept: a retry resumes from it
    headers = study_headers(image_store, case_id, study_uids)
    counts.held = held.check_studies(store, case_id, client.base_url, headers, issuer_of_patient_id)
    report(force=True)
    log.info(
        "imaging.pull.done",
        case_id=case_id,
        studies=counts.studies,
        instances=counts.instances,
        bytes=counts.bytes,
        skipped=counts.skipped,
        rejected=len(counts.rejected),
        held=counts.held,
        elapsed_ms=int((time.monotonic() - started) * 1000),
    )
    return counts


def study_headers(
    image_store: ImageStore, case_id: str, study_uids: Iterable[str]
) -> dict[str, list[Dataset]]:
    """One header (no pixels) per series of each study held for the case: what the identity
    check compares (from the DICOM JSON kept at ingest)."""
    wanted = set(study_uids)
    out: dict[str, list[Dataset]] = {}
    for ref, _count in image_store.iter_series(case_id, include_held=True):
        if ref.study_uid in wanted:
            out.setdefault(ref.study_uid, []).append(_header(image_store, ref))
    return out


def _header(image_store: ImageStore, ref: InstanceRef, tags: set[str] | None = None) -> Dataset:
    """The instance's header from its DICOM JSON (`tags` only, when given); from the file for
    an index row without it."""
    if ref.metadata_json is None:
        with image_store.open_instance(ref) as fh:
            return read_dataset(fh)
    attrs = json.loads(ref.metadata_json)
    if tags is not None:
        attrs = {t: e for t, e in attrs.items() if t in tags}
    return json_to_dataset(attrs)


_STUDY_TAGS = {f"{tag_for_keyword(k):08X}" for k in IMAGING_STUDY_KEYWORDS}


def case_imaging_studies(
    image_store: ImageStore, case_id: str, subject: dict[str, str], endpoint_url: str
) -> list[Resource]:
    """Endpoint + one ImagingStudy per study held for the case, from the headers kept at
    ingest (only the attributes the mapper reads)."""
    datasets = [  # held: left out later
        _header(image_store, ref, _STUDY_TAGS)
        for ref in image_store.iter_instances(case_id, include_held=True, with_metadata=True)
    ]
    return datasets_to_imaging_studies(datasets, subject, endpoint_url) if datasets else []


__all__ = [
    "PullCounts",
    "RetrievedInstance",
    "StudySelector",
    "case_imaging_studies",
    "pull_case_images",
    "resolve_studies",
    "study_selectors_for_case",
]
