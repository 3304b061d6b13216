"""STOW-RS into a case (PS3.18 10.5): `POST /cases/{id}/dicom-web/studies[/{study}]`,
`multipart/related; type="application/dicom"`, one instance per part, streamed to disk.

The answer is the Store Instances Response Module (DICOM JSON): ReferencedSOPSequence for what
was stored (with RetrieveURL), FailedSOPSequence with FailureReason for what was not; 200 all
stored, 202 some, 409 none (DW-20, DW-21). Who may store: the case's partner EHR and admins
(`api.documents.upload_grant`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from connectors.multipart import MultipartReader, PartData, PartEnd, PartStart, boundary_of
from fhir_gateway.api.deps import SettingsDep, StoreDep
from fhir_gateway.api.documents import NO_STORE, Grant, Images, check_length
from fhir_gateway.errors import InputError, PayloadTooLargeError, UnsupportedMediaTypeError
from fhir_gateway.records import uploads
from fhir_gateway.records.uploads import FileResult, Instance
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/cases/{case_id}/dicom-web", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"


def _check_type(content_type: str) -> bytes:
    main, *params = [p.strip() for p in content_type.split(";")]
    values = {
        k.strip().lower(): v.strip().strip('"').lower()
        for k, _, v in (p.partition("=") for p in params)
    }
    if main.lower() != "multipart/related" or values.get("type") != "application/dicom":
        raise UnsupportedMediaTypeError(
            'STOW-RS needs Content-Type multipart/related; type="application/dicom"'
        )
    return boundary_of(content_type)


async def _parts_to_files(request: Request, boundary: bytes, work: Path, limit: int) -> list[Path]:
    """Each part's body to its own file as it arrives (memory flat)."""
    reader = MultipartReader(boundary)
    files: list[Path] = []
    out = None
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLargeError(f"STOW body is over the {limit}-byte limit")
            for event in reader.feed(chunk):
                out = _handle(event, out, files, work)
        for event in reader.close():
            out = _handle(event, out, files, work)
    finally:
        if out is not None:
            out.close()
    return files


def _handle(event: Any, out: Any, files: list[Path], work: Path) -> Any:
    if isinstance(event, PartStart):
        path = work / f"part-{len(files):06d}"
        files.append(path)
        return path.open("wb")
    if isinstance(event, PartData) and out is not None:
        out.write(event.data)
        return out
    if isinstance(event, PartEnd) and out is not None:
        out.close()
        return None
    if out is not None:  # truncated part: closed; it will not read as DICOM
        out.close()
    return None


def _store(
    store: Store,
    settings: Settings,
    images: Any,
    grant: uploads.UploadGrant,
    files: list[Path],
    study_uid: str | None,
    root: str,
) -> tuple[int, dict[str, Any]]:
    good: list[Instance] = []
    failed: list[dict[str, Any]] = []
    for number, path in enumerate(files, start=1):
        try:
            good.append(uploads.read_instance(path, study_uid))
        except InputError as exc:
            reason = (
                uploads.FAILURE_STUDY_MISMATCH
                if "another study" in exc.message
                else uploads.FAILURE_NOT_UNDERSTOOD
            )
            failed.append({"part": number, "reason": reason})
    if good:
        uploads.keep_instances(store, settings, images, grant, good)
        result = FileResult("stow", True, "dicom", shas=[i.item.sha256 for i in good])
        uploads.queue_after(store, grant.case_id, [result])
    body: dict[str, Any] = {}
    if good:
        body["00081199"] = {  # ReferencedSOPSequence
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [i.item.sop_class_uid]},
                    "00081155": {"vr": "UI", "Value": [i.item.sop_uid]},
                    "00081190": {
                        "vr": "UR",
                        "Value": [
                            f"{root}/studies/{i.item.study_uid}/series/{i.item.series_uid}"
                            f"/instances/{i.item.sop_uid}"
                        ],
                    },
                }
                for i in good
            ],
        }
    if failed:
        body["00081198"] = {  # FailedSOPSequence
            "vr": "SQ",
            "Value": [{"00081197": {"vr": "US", "Value": [f["reason"]]}} for f in failed],
        }
    if study_uid:
        body["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{study_uid}"]}
    status = 200 if not failed else (202 if good else 409)
    log.info("stow.done", case_id=grant.case_id, stored=len(good), failed=len(failed))
    return status, body


async def _stow(
    request: Request,
    grant: uploads.UploadGrant,
    store: Store,
    settings: Settings,
    images: Any,
    study_uid: str | None,
) -> JSONResponse:
    boundary = _check_type(request.headers.get("content-type", ""))
    limit = settings.limits.max_upload_bytes
    check_length(request, limit)
    with images.staging() as staging:
        work = Path(tempfile.mkdtemp(prefix="stow-", dir=staging))
        try:
            files = await _parts_to_files(request, boundary, work, limit)
            if not files:
                raise InputError("STOW-RS body has no parts")
            root = f"{str(request.base_url).rstrip('/')}/cases/{grant.case_id}/dicom-web"
            status, body = await run_in_threadpool(
                _store, store, settings, images, grant, files, study_uid, root
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=NO_STORE)


@router.post("/studies")
async def stow_studies(
    request: Request, grant: Grant, store: StoreDep, settings: SettingsDep, images: Images
) -> JSONResponse:
    """STOW-RS StoreInstances (any study)."""
    return await _stow(request, grant, store, settings, images, None)


@router.post("/studies/{study_uid}")
async def stow_study(
    study_uid: str,
    request: Request,
    grant: Grant,
    store: StoreDep,
    settings: SettingsDep,
    images: Images,
) -> JSONResponse:
    """STOW-RS StoreInstances into one study (parts of another study fail with A900)."""
    return await _stow(request, grant, store, settings, images, study_uid)
