"""Imaging pull for a case: which studies (referral + QIDO by patient), fetch them over WADO-RS
(or C-MOVE a legacy PACS into an Orthanc first), keep them in the image store, map ImagingStudy.

`pull_case_images()` is a plain function (CLI and tests call it); the `pull_imaging` job wires it
to the case's partner and settings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
import structlog
from sqlalchemy import select

from connectors.dicomweb import (
    STUDY_UID,
    DicomwebClient,
    RejectedPart,
    Retrieved,
    RetrievedInstance,
    first_value,
    make_auth,
)
from connectors.orthanc import OrthancDimse, OrthancStorage
from fhir_gateway import audit, normalise
from fhir_gateway.errors import ConfigError
from fhir_gateway.images import FileImageStore, ImageStore, OrthancImageStore, read_dataset
from fhir_gateway.jobs import JobContext, job_handler
from fhir_gateway.partner_clients import token_provider_for
from fhir_gateway.resources import DICOM_UID, Resource
from fhir_gateway.settings import (
    Auth,
    BasicAuth,
    BearerAuth,
    DicomwebEndpoint,
    DimseEndpoint,
    Partner,
    Settings,
    SmartAuth,
)
from fhir_gateway.store.db import Store
from fhir_gateway.store.models import Case, FhirResource, StoredResource
from mappers.dicom import datasets_to_imaging_studies

log = structlog.get_logger(__name__)

ACSN = "ACSN"  # v2-0203 identifier type: accession number
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
    skipped: int = 0  # already held before this pull
    rejected: list[dict[str, str]] = field(default_factory=list)  # sop_uid/series_uid + reason

    def as_progress(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "instances": self.instances,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "rejected": len(self.rejected),
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
    progress_every_s: float = 1.0,
    batch_size: int = 32,
) -> PullCounts:
    """Fetch every selected study into `image_store` for the case; idempotent and resumable.

    Instances already held are skipped (per series; per instance when a series is partly held).
    Index rows are written `batch_size` at a time (one transaction each).
    A part that is not valid DICOM is rejected with its reason; the others are kept.

    Raises:
        UpstreamUnavailableError: the source failed (the job retries; what was fetched stays).
    """
    counts = PullCounts()
    started = time.monotonic()
    last_report = [0.0]

    def report(force: bool = False) -> None:
        now = time.monotonic()
        if progress_cb is not None and (force or now - last_report[0] >= progress_every_s):
            last_report[0] = now
            progress_cb({"imaging": counts.as_progress()})

    pending: list[RetrievedInstance] = []

    def flush() -> None:
        if pending:
            image_store.add_batch(case_id, pending, client.base_url)
            counts.instances += len(pending)
            counts.bytes += sum(p.size for p in pending)
            pending.clear()
            report()

    def sink(result: Retrieved) -> None:
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
        if len(pending) >= batch_size:
            flush()

    study_uids = resolve_studies(client, study_selectors)
    counts.studies = len(study_uids)
    staging = image_store.staging_dir()
    try:
        for study_uid in study_uids:
            held = image_store.held_sop_uids(case_id, study_uid)
            counts.skipped += len(held)
            plans = client.plan_study(study_uid, held)
            client.pull_plans(plans, staging, sink)
    finally:
        flush()  # what arrived before a failure is kept: a retry resumes from it
    report(force=True)
    log.info(
        "imaging.pull.done",
        case_id=case_id,
        studies=counts.studies,
        instances=counts.instances,
        bytes=counts.bytes,
        skipped=counts.skipped,
        rejected=len(counts.rejected),
        elapsed_ms=int((time.monotonic() - started) * 1000),
    )
    return counts


def case_imaging_studies(
    image_store: ImageStore, case_id: str, subject: dict[str, str], endpoint_url: str
) -> list[Resource]:
    """Endpoint + one ImagingStudy per study held for the case, from the stored headers."""
    datasets = []
    for ref in image_store.iter_instances(case_id):
        with image_store.open_instance(ref) as fh:
            datasets.append(read_dataset(fh))
    return datasets_to_imaging_studies(datasets, subject, endpoint_url) if datasets else []


def save_imaging_studies(
    store: Store, case_id: str, source: str, resources: list[Resource]
) -> None:
    """Upsert the mapped ImagingStudy/Endpoint resources as the case's stored resources."""
    with store.session() as s:
        for res in resources:
            row = s.scalar(
                select(StoredResource).where(
                    StoredResource.case_id == case_id,
                    StoredResource.source == source,
                    StoredResource.resource_type == res["resourceType"],
                    StoredResource.source_id == res["id"],
                )
            )
            if row is None:
                s.add(
                    StoredResource(
                        case_id=case_id,
                        source=source,
                        resource_type=res["resourceType"],
                        source_id=res["id"],
                        body=res,
                    )
                )
            else:
                row.body = res
        audit.record(
            s,
            "images.pull",
            audit.SYSTEM,
            case_id=case_id,
            patient=audit.patient_of_case(s, case_id),
            entity=[f"source:{source}"]
            + [f"ImagingStudy/{r['id']}" for r in resources if r["resourceType"] == "ImagingStudy"],
        )


# --- wiring from settings -------------------------------------------------------------------


def requests_auth(
    auth: Auth, token_provider: Callable[[], str] | None = None
) -> requests.auth.AuthBase | None:
    """The settings' auth of a source as a requests auth (SMART needs `token_provider`)."""
    if isinstance(auth, BasicAuth):
        return make_auth(
            "basic", username=auth.username, password=auth.password().get_secret_value()
        )
    if isinstance(auth, BearerAuth):
        return make_auth("bearer", token=auth.token().get_secret_value())
    if isinstance(auth, SmartAuth):
        if token_provider is None:
            raise ConfigError("SMART auth for DICOMweb needs a token provider (connectors.smart)")
        return make_auth("smart", token_provider=token_provider)
    return None


def _smart_token(endpoint: DicomwebEndpoint | DimseEndpoint) -> Callable[[], str] | None:
    """SMART tokens for an imaging endpoint: the same provider code path as the FHIR pull."""
    if not isinstance(endpoint.auth, SmartAuth):
        return None
    provider = token_provider_for(endpoint, resource_types=("ImagingStudy",), system="imaging")
    return provider.token if provider is not None else None


def build_image_store(settings: Settings, store: Store, session: requests.Session) -> ImageStore:
    """The image store selected in settings (`images.backend`)."""
    cfg = settings.images
    if cfg.backend == "orthanc":
        password = os.environ.get(cfg.orthanc_password_env or "", "") or None
        orthanc = OrthancStorage(
            session,
            cfg.orthanc_url,
            username=cfg.orthanc_username,
            password=password,
            timeout_s=cfg.timeout_s,
        )
        return OrthancImageStore(store, settings.data_dir, orthanc)
    return FileImageStore(store, settings.data_dir)


def case_dicomweb_url(settings: Settings, case_id: str) -> str:
    return f"{settings.public_base_url.rstrip('/')}/cases/{case_id}/dicom-web"


def pull_for_partner(
    settings: Settings,
    store: Store,
    case_id: str,
    partner: Partner,
    progress_cb: ProgressCallback | None = None,
    token_provider: Callable[[], str] | None = None,
) -> PullCounts:
    """Pull a case's images from its partner: DICOMweb, or a DIMSE PACS via Orthanc C-MOVE."""
    session = requests.Session()
    image_store = build_image_store(settings, store, session)
    endpoint = partner.dicomweb
    if endpoint is not None:
        token_provider = token_provider or _smart_token(endpoint)
        client = DicomwebClient(
            session,
            endpoint.base_url,
            timeout_s=endpoint.timeout_s,
            auth=requests_auth(endpoint.auth, token_provider),
            max_parallel=min(endpoint.max_parallel, settings.images.max_parallel_series),
        )
        selectors = study_selectors_for_case(store, case_id, endpoint)
    elif partner.dimse is not None:
        dimse = partner.dimse
        auth = requests_auth(dimse.auth, token_provider or _smart_token(dimse))
        selectors = study_selectors_for_case(store, case_id, None)
        bridge = OrthancDimse(session, dimse.orthanc_url, dimse.modality, auth=auth)
        moved = move_from_dimse(bridge, selectors)
        # The studies are now in the bridging Orthanc: fetch them over its DICOMweb.
        client = DicomwebClient(
            session, dimse.orthanc_url.rstrip("/") + "/dicom-web", auth=auth, system="orthanc"
        )
        selectors = [StudySelector(study_uid=uid) for uid in moved]
    else:
        return PullCounts()
    counts = pull_case_images(store, case_id, client, image_store, selectors, progress_cb)
    with store.session() as s:
        case = s.get(Case, case_id)
        subject = {"reference": case.patient_ref} if case is not None else {}
    resources = case_imaging_studies(
        image_store, case_id, subject, case_dicomweb_url(settings, case_id)
    )
    save_imaging_studies(store, case_id, client.base_url, resources)
    return counts


def move_from_dimse(bridge: OrthancDimse, selectors: Iterable[StudySelector]) -> list[str]:
    """C-FIND each selector at the legacy PACS and C-MOVE the answers into the Orthanc."""
    uids: list[str] = []
    for sel in selectors:
        query = {
            k: v
            for k, v in (
                ("StudyInstanceUID", sel.study_uid),
                ("AccessionNumber", sel.accession_number),
                ("PatientID", sel.patient_id),
            )
            if v
        }
        query_id, answers = bridge.find_studies(query)
        if answers:
            bridge.move(query_id)
            uids += [str(a.get("StudyInstanceUID", "")) for a in answers]
    return [u for u in dict.fromkeys(uids) if u]


@job_handler("pull_imaging")
def run_pull_imaging(ctx: JobContext) -> None:
    """Job: pull the case's images from its partner; progress under `imaging`."""
    if ctx.case_id is None or ctx.partner is None:
        return
    counts = pull_for_partner(ctx.settings, ctx.store, ctx.case_id, ctx.partner, ctx.progress)
    ctx.progress({"imaging": {**counts.as_progress(), "rejected_parts": counts.rejected}})
    normalise.queue_after_pull(ctx)


__all__ = [
    "PullCounts",
    "RetrievedInstance",
    "StudySelector",
    "case_imaging_studies",
    "pull_case_images",
    "study_selectors_for_case",
]
