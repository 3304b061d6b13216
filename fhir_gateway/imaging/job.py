"""The `pull_imaging` job: a case's images from its partner's PACS, wired from settings.

DICOMweb sources are pulled with `fhir_gateway.imaging.retrieval.pull_case_images`; a PACS that only
speaks DIMSE is first C-MOVEd into an Orthanc, whose DICOMweb is then pulled the same way.
The stored headers are mapped to ImagingStudy resources of the case, and normalisation is
queued.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import requests
from sqlalchemy import select

from connectors.dicomweb import DicomwebClient, make_auth
from connectors.orthanc import OrthancDimse, OrthancStorage
from fhir_gateway import jobs
from fhir_gateway.casebundle import normalise
from fhir_gateway.errors import ConfigError
from fhir_gateway.imaging.retrieval import (
    ProgressCallback,
    PullCounts,
    StudySelector,
    case_imaging_studies,
    pull_case_images,
    study_selectors_for_case,
)
from fhir_gateway.imaging.store import FileImageStore, ImageStore, OrthancImageStore
from fhir_gateway.jobs import JobContext
from fhir_gateway.records.partner_clients import token_provider_for
from fhir_gateway.resources import Resource
from fhir_gateway.security import audit
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
from fhir_gateway.store.models import Case, StoredResource

KIND = "pull_imaging"


def save_imaging_studies(
    store: Store, case_id: str, source: str, resources: list[Resource]
) -> None:
    """Upsert the mapped ImagingStudy/Endpoint resources as the case's stored resources.

    Raises:
        CaseClosedError: the case was cancelled or rejected (nothing is written).
    """
    with store.session() as s:
        jobs.require_case_open(s, case_id, "saving imaging studies")
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
    return f"{settings.base_url}/cases/{case_id}/dicom-web"


def pull_for_partner(
    settings: Settings,
    store: Store,
    case_id: str,
    partner: Partner,
    progress_cb: ProgressCallback | None = None,
    token_provider: Callable[[], str] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> PullCounts:
    """Pull a case's images from its partner: DICOMweb, or a DIMSE PACS via Orthanc C-MOVE."""
    session = requests.Session()
    image_store = build_image_store(settings, store, session)
    endpoint = partner.dicomweb
    issuer: str | None = None
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
        issuer = endpoint.issuer_of_patient_id
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
    counts = pull_case_images(
        store,
        case_id,
        client,
        image_store,
        selectors,
        progress_cb,
        checkpoint=checkpoint,
        issuer_of_patient_id=issuer,
    )
    if checkpoint is not None:
        checkpoint()
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


def run_pull_imaging(ctx: JobContext) -> None:
    """Job: pull the case's images from its partner; progress under `imaging`."""
    if ctx.case_id is None or ctx.partner is None:
        return
    counts = pull_for_partner(
        ctx.settings,
        ctx.store,
        ctx.case_id,
        ctx.partner,
        ctx.progress,
        checkpoint=lambda: ctx.checkpoint("pulling images"),
    )
    ctx.progress({"imaging": {**counts.as_progress(), "rejected_parts": counts.rejected}})
    normalise.queue_after_pull(ctx)
