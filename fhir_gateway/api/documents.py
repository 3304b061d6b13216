"""Documents of a case: upload (`POST /cases/{id}/documents`), list, and content.

Uploads are for the referring partner's EHR (its own cases only) and admins; each file gets
its own result (accepted, or rejected with the reason and nothing stored). Content is served
to whoever may see the case, audited, never cached.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from fhir_gateway.api.deps import ANY_ROLE, EHR_OR_ADMIN, SettingsDep, StoreDep
from fhir_gateway.api.dicomweb import get_image_store
from fhir_gateway.casebundle import held
from fhir_gateway.errors import (
    InputError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    operation_outcome,
)
from fhir_gateway.imaging.store import ImageStore
from fhir_gateway.records import documents, uploads
from fhir_gateway.records.uploads import FileResult, UploadGrant
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import CaseDocument, HeldItem

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/cases/{case_id}", tags=["documents"])
MAX_FILES = 200
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def upload_grant(case_id: str, store: StoreDep, who: Principal = EHR_OR_ADMIN) -> UploadGrant:
    """Dependency: the caller may upload into this case (a partner's EHR: its own cases; an
    admin: any). A link token for one case can later produce the same grant."""
    with store.session() as s:
        access.get_case(s, case_id, who)
    source = f"partner:{who.partner_id}" if who.role == "ehr" else f"{who.role}:{who.sub}"
    return UploadGrant(case_id=case_id, actor=who.actor, source=source)


Grant = Annotated[UploadGrant, Depends(upload_grant)]
Images = Annotated[ImageStore, Depends(get_image_store)]


def check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes is over the {limit}-byte limit")


def results_response(results: list[FileResult]) -> JSONResponse:
    """200 when every file was accepted, 207-like 200 with per-file results when some were;
    when none was, the status of the first refusal (413, 415, 422, 400)."""
    files: list[dict[str, Any]] = []
    for r in results:
        item = r.as_json()
        if not r.accepted:
            item["outcome"] = operation_outcome(
                {
                    "severity": "error",
                    "code": "too-costly" if r.status == 413 else "invalid",
                    "diagnostics": r.reason,
                    "expression": [f"file[{len(files)}]"],
                }
            )
        files.append(item)
    accepted = sum(1 for r in results if r.accepted)
    status = 200 if accepted else (results[0].status if results else 400)
    body = {"accepted": accepted, "rejected": len(results) - accepted, "files": files}
    return JSONResponse(body, status_code=status, headers=NO_STORE)


@router.post("/documents")
async def upload_documents(
    request: Request, grant: Grant, store: StoreDep, settings: SettingsDep, images: Images
) -> JSONResponse:
    """Upload documents and images into the case: multipart/form-data, one or more files."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaTypeError(
            f"Content-Type must be multipart/form-data, got {ctype.split(';')[0] or 'none'!r}"
        )
    limits = settings.limits
    check_length(request, limits.max_upload_bytes)
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    staging = settings.data_dir / "tmp" / "uploads"
    staging.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="up-", dir=staging))
    try:
        files: list[tuple[str, str, Path]] = []
        total = 0
        for index, (_, value) in enumerate(form.multi_items()):
            if not isinstance(value, UploadFile):
                continue
            path = work / f"{index:04d}"
            with path.open("wb") as out:
                while chunk := await value.read(1 << 20):
                    total += len(chunk)
                    if total > limits.max_upload_bytes:
                        raise PayloadTooLargeError(
                            f"upload is over the {limits.max_upload_bytes}-byte limit"
                        )
                    out.write(chunk)
            files.append((value.filename or f"file[{index}]", value.content_type or "", path))
        if not files:
            raise InputError("no file in the form (send one or more file parts)")
        results = await run_in_threadpool(
            uploads.receive_files, store, settings, images, grant, files
        )
    finally:
        await form.close()
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "documents.upload.done",
        case_id=grant.case_id,
        files=len(results),
        accepted=sum(1 for r in results if r.accepted),
    )
    return results_response(results)


@router.get("/documents")
def list_case_documents(
    case_id: str, request: Request, store: StoreDep, who: Principal = ANY_ROLE
) -> JSONResponse:
    """The case's documents (kinds, origins, links; no content)."""
    base = str(request.base_url).rstrip("/")
    with store.session() as s:
        case = access.get_case(s, case_id, who)
        hidden = _held_sources(s, case_id) if who.role != "admin" else set()
        rows = [
            documents.document_view(r, base)
            for r in documents.list_documents(s, case_id)
            if documents.source_of(r.id) not in hidden
        ]
        audit.record(
            s,
            "document.list",
            who.actor,
            case_id=case_id,
            patient=case.patient_ref,
            entity=[f"count:{len(rows)}"],
        )
    return JSONResponse(rows, headers=NO_STORE)


def _held_sources(session: Any, case_id: str) -> set[str]:
    return set(
        session.scalars(
            select(HeldItem.source).where(HeldItem.case_id == case_id, HeldItem.state.in_(held.OUT))
        )
    )


@router.get("/documents/{doc_id}/content")
def document_content(
    case_id: str,
    doc_id: str,
    store: StoreDep,
    settings: SettingsDep,
    format: str = "original",
    who: Principal = ANY_ROLE,
) -> FileResponse:
    """The document as received (`format=original`) or its text (`format=text`: the text layer
    of a PDF, a plain-text document as is). Audited; `Cache-Control: no-store`."""
    if format not in ("original", "text"):
        raise InputError("format must be original or text", expression=["format"])
    with store.session() as s:
        case = access.get_case(s, case_id, who)
        row = s.get(CaseDocument, doc_id)
        if row is None or row.case_id != case_id:
            raise NotFoundError("no document with this id in this case")
        if who.role != "admin" and documents.source_of(doc_id) in _held_sources(s, case_id):
            raise NotFoundError("this document is held by the identity check")
        if format == "text":
            if row.text_sha256 is not None:
                sha, media = row.text_sha256, "text/plain; charset=utf-8"
            elif row.kind == "text":
                sha, media = row.sha256, "text/plain; charset=utf-8"
            else:
                raise NotFoundError("this document has no text (not a PDF with a text layer)")
        else:
            sha, media = row.sha256, row.content_type
        audit.record(
            s,
            "document.read",
            who.actor,
            case_id=case_id,
            patient=case.patient_ref,
            entity=[f"document:{doc_id}", f"format:{format}"],
        )
    path = documents.binary_dir(settings.data_dir) / sha
    if not path.is_file():
        raise NotFoundError("the document's content is no longer stored")
    return FileResponse(path, media_type=media, headers=NO_STORE)
