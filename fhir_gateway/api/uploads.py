"""Resumable uploads into a case over tus 1.0.0 (https://tus.io/protocols/resumable-upload):
core (HEAD offset, PATCH with Upload-Offset), creation, checksum (sha1, sha256), termination,
at `/cases/{id}/uploads/`. A completed file is processed like a document upload.

Why our own: tuspyserver (PyPI, 4.4) is the maintained FastAPI tus server, but its router has
a fixed prefix (no per-case path), no checksum extension, serves uploaded files back over an
unaudited GET, and its creation-with-upload reads the body into memory. The protocol part we
need is small: this module, with state in two files per upload under the data directory
(`<id>.json` + `<id>.part`; the offset is the part file's size, so a crash loses nothing written).

Who may upload is the `UploadGrant` dependency (`tus_grant`): a partner's EHR or an admin (bearer
token, `api.documents.upload_grant`), or a patient upload link (`Upload-Link: <token>`, scoped
to its one case; `records.upload_links`). A link's files are listed for the link, and a link
caller sees only the link's view of a result (names, results, reasons; no case data).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from fhir_gateway.api.deps import SettingsDep, StoreDep, principal_of
from fhir_gateway.api.documents import NO_STORE, Images, upload_grant
from fhir_gateway.errors import (
    ConflictError,
    ForbiddenError,
    InputError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from fhir_gateway.records import upload_links, uploads
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/cases/{case_id}/uploads", tags=["uploads"])
TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,termination,checksum"
ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
OFFSET_TYPE = "application/offset+octet-stream"
CHECKSUM_MISMATCH = 460  # tus checksum extension


class LockedError(ConflictError):
    status_code = 423
    issue_code = "lock-error"


@dataclass
class TusUpload:
    id: str
    case_id: str
    owner: str  # the grant's source: only the same uploader may continue it
    length: int
    metadata: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] | None = None


def tus_grant(case_id: str, request: Request, store: StoreDep) -> uploads.UploadGrant:
    """Dependency: a patient upload link's token in `Upload-Link` (refused: 404/410, audited),
    else the bearer token of a partner's EHR or an admin."""
    token = request.headers.get(upload_links.HEADER)
    if token is not None:
        return upload_links.resolve(store, token.strip(), "upload", case_id).grant()
    who: Principal = principal_of(request)
    if who.role not in ("ehr", "admin"):
        raise ForbiddenError(f"role {who.role!r} may not do this (needs ehr or admin)")
    return upload_grant(case_id, store, who)


Grant = Annotated[uploads.UploadGrant, Depends(tus_grant)]


def _dir(settings: Settings) -> Path:
    path = settings.data_dir / "tmp" / "tus"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _paths(settings: Settings, upload_id: str) -> tuple[Path, Path]:
    root = _dir(settings)
    return root / f"{upload_id}.json", root / f"{upload_id}.part"


def _load(settings: Settings, grant: uploads.UploadGrant, upload_id: str) -> TusUpload:
    try:
        uuid.UUID(hex=upload_id)
    except ValueError:
        raise NotFoundError("no such upload") from None
    meta, _ = _paths(settings, upload_id)
    if not meta.is_file():
        raise NotFoundError("no such upload")
    found = TusUpload(**json.loads(meta.read_text()))
    if found.case_id != grant.case_id or found.owner != grant.source:
        raise NotFoundError("no such upload")
    return found


def _save(settings: Settings, upload: TusUpload) -> None:
    meta, _ = _paths(settings, upload.id)
    tmp = meta.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(upload)))
    os.replace(tmp, meta)


def _headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, **NO_STORE, **extra}


def _require_version(request: Request) -> None:
    version = request.headers.get("tus-resumable")
    if version != TUS_VERSION:
        raise _VersionError(f"Tus-Resumable must be {TUS_VERSION}")


class _VersionError(InputError):
    status_code = 412
    issue_code = "not-supported"


def _int_header(request: Request, name: str) -> int:
    value = request.headers.get(name, "")
    if not value.isdigit():
        raise InputError(f"{name} must be a non-negative integer", expression=[name])
    return int(value)


def parse_metadata(value: str) -> dict[str, str]:
    """`Upload-Metadata: filename ZG9j,filetype YXBw` -> {"filename": "doc", ...}."""
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        key, _, encoded = pair.partition(" ")
        try:
            out[key] = base64.b64decode(encoded, validate=True).decode("utf-8") if encoded else ""
        except (binascii.Error, UnicodeDecodeError):
            raise InputError(
                "Upload-Metadata values must be base64", expression=["Upload-Metadata"]
            ) from None
    return out


def _checksum(request: Request) -> tuple[str, bytes] | None:
    value = request.headers.get("upload-checksum")
    if not value:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    if algorithm not in ALGORITHMS:
        raise InputError(
            f"checksum algorithm not supported (use {', '.join(ALGORITHMS)})",
            expression=["Upload-Checksum"],
        )
    try:
        return algorithm, base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise InputError(
            "Upload-Checksum value must be base64", expression=["Upload-Checksum"]
        ) from None


@router.options("/")
def tus_options(grant: Grant, settings: SettingsDep) -> Response:
    """tus discovery: version, extensions, the largest upload, checksum algorithms (for a
    caller who may upload into the case: every endpoint but discovery and health needs a token)."""
    return Response(
        status_code=204,
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": EXTENSIONS,
            "Tus-Max-Size": str(settings.limits.max_tus_bytes),
            "Tus-Checksum-Algorithm": ",".join(ALGORITHMS),
        },
    )


@router.post("/")
def tus_create(request: Request, grant: Grant, settings: SettingsDep, store: StoreDep) -> Response:
    """Creation: `Upload-Length` (required; deferred length is not supported)."""
    _require_version(request)
    length = _int_header(request, "upload-length")
    if length > settings.limits.max_tus_bytes:
        raise PayloadTooLargeError(
            f"Upload-Length {length} is over the {settings.limits.max_tus_bytes}-byte limit"
        )
    metadata = parse_metadata(request.headers.get("upload-metadata", ""))
    upload = TusUpload(uuid.uuid4().hex, grant.case_id, grant.source, length, metadata)
    _save(settings, upload)
    _paths(settings, upload.id)[1].touch()
    with store.session() as s:
        audit.record(
            s,
            "upload.create",
            grant.actor,
            case_id=grant.case_id,
            patient=audit.patient_of_case(s, grant.case_id),
            entity=[f"upload:{upload.id}", f"length:{length}"],
        )
    log.info("tus.created", case_id=grant.case_id, upload_id=upload.id, length=length)
    location = f"{str(request.base_url).rstrip('/')}/cases/{grant.case_id}/uploads/{upload.id}"
    return Response(status_code=201, headers=_headers(Location=location))


@router.head("/{upload_id}")
def tus_head(upload_id: str, request: Request, grant: Grant, settings: SettingsDep) -> Response:
    """Core: where to resume (`Upload-Offset`)."""
    _require_version(request)
    upload = _load(settings, grant, upload_id)
    offset = (
        _paths(settings, upload_id)[1].stat().st_size if upload.result is None else upload.length
    )
    return Response(
        status_code=200,
        headers=_headers(**{"Upload-Offset": str(offset), "Upload-Length": str(upload.length)}),
    )


@router.get("/{upload_id}")
def tus_status(upload_id: str, grant: Grant, settings: SettingsDep) -> JSONResponse:
    """Not tus: the upload's progress and, once complete, its result (as a document upload)."""
    upload = _load(settings, grant, upload_id)
    part = _paths(settings, upload_id)[1]
    offset = part.stat().st_size if part.exists() else upload.length
    body = {"id": upload.id, "length": upload.length, "offset": offset, "result": upload.result}
    return JSONResponse(body, headers=NO_STORE)


@router.patch("/{upload_id}")
async def tus_patch(
    upload_id: str,
    request: Request,
    grant: Grant,
    settings: SettingsDep,
    store: StoreDep,
    images: Images,
) -> Response:
    """Core: append the body at `Upload-Offset` (streamed to the part file: memory stays flat);
    with `Upload-Checksum` the chunk is kept only if it matches (else 460, nothing kept)."""
    _require_version(request)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != OFFSET_TYPE:
        raise UnsupportedMediaTypeError(f"PATCH Content-Type must be {OFFSET_TYPE}")
    upload = _load(settings, grant, upload_id)
    if upload.result is not None:
        raise ConflictError("this upload is complete")
    offset = _int_header(request, "upload-offset")
    checksum = _checksum(request)
    part = _paths(settings, upload_id)[1]
    with part.open("r+b") as out:
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError("another PATCH of this upload is in progress") from None
        current = out.seek(0, os.SEEK_END)
        if offset != current:
            raise ConflictError(f"Upload-Offset {offset} is not the upload's offset {current}")
        digest = ALGORITHMS[checksum[0]]() if checksum else None
        written, ok = 0, True
        try:
            async for chunk in request.stream():
                written += len(chunk)
                if current + written > upload.length:
                    ok = False
                    break
                out.write(chunk)
                if digest is not None:
                    digest.update(chunk)
        except ClientDisconnect:
            # Interrupted: keep what arrived (the client resumes from HEAD), unless it was to be
            # verified by a checksum that can no longer be checked.
            if digest is not None:
                out.truncate(current)
            out.flush()
            log.info("tus.interrupted", upload_id=upload_id, kept=out.tell() - current)
            return Response(status_code=400, headers=_headers())
        if not ok:
            out.truncate(current)
            raise PayloadTooLargeError("the body goes past the declared Upload-Length")
        if digest is not None and checksum is not None and digest.digest() != checksum[1]:
            out.truncate(current)
            return Response(
                status_code=CHECKSUM_MISMATCH,
                content=b"checksum mismatch: the chunk was not kept",
                headers=_headers(**{"Upload-Offset": str(current)}),
            )
        out.flush()
        os.fsync(out.fileno())
        new_offset = current + written
    headers = {"Upload-Offset": str(new_offset)}
    if new_offset == upload.length:
        result = await run_in_threadpool(_complete, store, settings, images, grant, upload, part)
        headers["Upload-Result"] = result["result"]
    return Response(status_code=204, headers=_headers(**headers))


def _complete(
    store: Any,
    settings: Settings,
    images: Any,
    grant: uploads.UploadGrant,
    upload: TusUpload,
    part: Path,
) -> dict[str, Any]:
    """The file is whole (its size is the declared Upload-Length): process it as an upload."""
    if part.stat().st_size != upload.length:
        raise ConflictError("upload size differs from Upload-Length")
    name = upload.metadata.get("filename") or f"upload-{upload.id}"
    declared = upload.metadata.get("filetype") or ""
    if grant.link_id is not None:
        upload.result = upload_links.receive(store, settings, images, grant, name, declared, part)
    else:
        result = uploads.receive_file(store, settings, images, grant, name, declared, part)
        uploads.queue_after(store, grant.case_id, [result])
        upload.result = result.as_json()
    _save(settings, upload)
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
    log.info("tus.completed", upload_id=upload.id, result=upload.result["result"])
    return upload.result


@router.delete("/{upload_id}")
def tus_terminate(
    upload_id: str, request: Request, grant: Grant, settings: SettingsDep
) -> Response:
    """Termination: the upload and what it received are removed."""
    _require_version(request)
    _load(settings, grant, upload_id)
    for path in _paths(settings, upload_id):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    log.info("tus.terminated", upload_id=upload_id)
    return Response(status_code=204, headers=_headers())
