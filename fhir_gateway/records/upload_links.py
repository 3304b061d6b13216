"""Patient upload links: an admin makes a link for one case; whoever holds it may upload files
into that case (and see the list of what the link received) - nothing else.

- The token is `secrets.token_urlsafe(32)` (256 bits); only its SHA-256 is stored, so the
  database never holds a usable link. It expires (7 days by default, 30 at most) and can be
  revoked; an expired, revoked or unknown token is refused (410 / 404) and the refusal audited.
- Every use is audited: the page opened, each upload created and each file received.
- A CD folder arrives as many single files (one tus upload each). Each DICOM Part 10 instance
  is checked and kept as it arrives (image store, identity check of its study); the study's
  ImagingStudy is rebuilt - and the case's normalisation queued - by one `link_studies` job per
  burst of arrivals (a queued one absorbs the arrivals after it), not once per file: a 200-file
  CD costs a few rebuilds, not 200 rebuilds of a growing study. The DICOMDIR itself is accepted
  and ignored (the instances are read from their own files, whether a DICOMDIR came or not).

Imports: `store`, `security`, `jobs`, `imaging`, `records.uploads` (the step may use its peers).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import requests
import structlog
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.casebundle import held
from fhir_gateway.errors import GoneError, InputError, NotFoundError, ValidationError
from fhir_gateway.imaging.job import build_image_store
from fhir_gateway.imaging.store import ImageStore
from fhir_gateway.records import documents, uploads
from fhir_gateway.records.uploads import FileResult, UploadGrant
from fhir_gateway.resources import new_id
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import (
    HeldItem,
    ImageInstance,
    Job,
    UploadLink,
    UploadLinkFile,
    utcnow,
)

log = structlog.get_logger(__name__)

KIND = "link_studies"
TOKEN_BYTES = 32
DEFAULT_DAYS = 7
MAX_DAYS = 30
PATH = "/upload"  # the page: {base}/upload/{token}
HEADER = "Upload-Link"  # the token on the tus requests the page makes
LINK_ROLE = "upload-link"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # PS3.4 Annex F: the DICOMDIR's SOP Class
SETTLE = timedelta(seconds=1)  # a link_studies job waits this long for more arrivals
DICOMDIR_NOTE = "the CD's index (DICOMDIR): the images are read from their own files"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def link_url(settings: Settings, token: str) -> str:
    return f"{settings.base_url.rstrip('/')}{PATH}/{token}"


def _actor(link_id: str) -> audit.Actor:
    return audit.Actor(f"upload-link:{link_id}", LINK_ROLE)


def _view(link: UploadLink, now: datetime) -> dict[str, Any]:
    status = "revoked" if link.revoked_at else ("expired" if link.expires_at <= now else "active")
    return {
        "id": link.id,
        "case": link.case_id,
        "status": status,
        "createdBy": link.created_by,
        "created": link.created_at.isoformat(),
        "expires": link.expires_at.isoformat(),
        "revoked": link.revoked_at.isoformat() if link.revoked_at else None,
    }


# --------------------------------------------------------------------------- admin


def create_link(
    store: Store, settings: Settings, case_id: str, who: Principal, days: int | None = None
) -> dict[str, Any]:
    """A new link for the case (admin). The answer carries the URL - the only time the token
    is shown.

    Raises:
        NotFoundError: no such case. ValidationError: `days` outside 1..30.
    """
    days = DEFAULT_DAYS if days is None else days
    if not 1 <= days <= MAX_DAYS:
        raise ValidationError(
            f"expiresInDays must be between 1 and {MAX_DAYS}", expression=["expiresInDays"]
        )
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = utcnow()
    with store.session() as s:
        access.get_case(s, case_id, who)
        jobs.require_case_open(s, case_id, "creating an upload link")
        link = UploadLink(
            id=new_id(),
            case_id=case_id,
            token_sha256=token_hash(token),
            created_by=who.sub,
            created_at=now,
            expires_at=now + timedelta(days=days),
        )
        s.add(link)
        s.flush()
        audit.record(
            s,
            "upload-link.create",
            who.actor,
            case_id=case_id,
            patient=audit.patient_of_case(s, case_id),
            entity=[f"upload-link:{link.id}", f"days:{days}"],
        )
        view = _view(link, now)
    log.info("upload_link.created", case_id=case_id, link_id=view["id"], days=days)
    return {**view, "url": link_url(settings, token)}


def list_links(store: Store, case_id: str, who: Principal) -> list[dict[str, Any]]:
    """The case's links, newest first, without tokens (admin)."""
    now = utcnow()
    with store.session(readonly=True) as s:
        access.get_case(s, case_id, who)
        rows = s.scalars(
            select(UploadLink)
            .where(UploadLink.case_id == case_id)
            .order_by(UploadLink.created_at.desc())
        ).all()
        out = []
        for link in rows:
            view = _view(link, now)
            view["files"] = len(
                s.scalars(select(UploadLinkFile.id).where(UploadLinkFile.link_id == link.id)).all()
            )
            out.append(view)
    return out


def revoke_link(store: Store, case_id: str, link_id: str, who: Principal) -> dict[str, Any]:
    """Revoke the link at once (admin); revoking twice keeps the first revocation.

    Raises:
        NotFoundError: no such case, or no such link of this case.
    """
    with store.session() as s:
        access.get_case(s, case_id, who)
        link = s.get(UploadLink, link_id)
        if link is None or link.case_id != case_id:
            raise NotFoundError("no such upload link for this case")
        if link.revoked_at is None:
            link.revoked_at = utcnow()
            link.revoked_by = who.sub
        audit.record(
            s,
            "upload-link.revoke",
            who.actor,
            case_id=case_id,
            patient=audit.patient_of_case(s, case_id),
            entity=[f"upload-link:{link.id}"],
        )
        s.flush()
        view = _view(link, utcnow())
    log.info("upload_link.revoked", case_id=case_id, link_id=link_id)
    return view


# --------------------------------------------------------------------------- the link's holder


@dataclass(frozen=True)
class LinkUse:
    """A token that is valid now: its link and the case it uploads into."""

    link_id: str
    case_id: str
    expires_at: datetime

    def grant(self) -> UploadGrant:
        return UploadGrant(
            case_id=self.case_id,
            actor=_actor(self.link_id),
            source=f"link:{self.link_id}",
            link_id=self.link_id,
        )


def resolve(store: Store, token: str, use: str, case_id: str | None = None) -> LinkUse:
    """The link of `token`, if it may be used now (for `case_id`, when given); `use` names what
    for in the audit row (`page`, `upload`, `list`). A refusal is audited in its own transaction.

    Raises:
        NotFoundError: unknown token, or a link of another case. GoneError: expired or revoked.
    """
    now = utcnow()
    with store.session(readonly=True) as s:
        link = s.scalar(select(UploadLink).where(UploadLink.token_sha256 == token_hash(token)))
        found = None if link is None else (link.id, link.case_id, link.expires_at, link.revoked_at)
    if found is None:
        _refused(store, None, None, use, "unknown")
        raise NotFoundError("this upload link is not known (check the address you were given)")
    link_id, link_case, expires_at, revoked_at = found
    if case_id is not None and case_id != link_case:
        _refused(store, link_id, None, use, "other-case")
        raise NotFoundError("this upload link is not known (check the address you were given)")
    if revoked_at is not None:
        _refused(store, link_id, link_case, use, "revoked")
        raise GoneError("this upload link was withdrawn; ask the team that sent it for a new one")
    if expires_at <= now:
        _refused(store, link_id, link_case, use, "expired")
        raise GoneError("this upload link has expired; ask the team that sent it for a new one")
    return LinkUse(link_id, link_case, expires_at)


def _refused(store: Store, link_id: str | None, case_id: str | None, use: str, why: str) -> None:
    actor = _actor(link_id) if link_id else audit.Actor("anonymous", "none")
    with store.session() as s:
        audit.record(
            s,
            "upload-link.refused",
            actor,
            case_id=case_id,
            entity=[f"upload-link:{link_id or 'unknown'}", f"use:{use}", f"reason:{why}"],
            outcome=audit.MINOR_FAILURE,
        )
    log.info("upload_link.refused", link_id=link_id, use=use, reason=why)


def record_use(store: Store, link: LinkUse, action: str, entity: list[str] | None = None) -> None:
    """Audit one use of a valid link (the page opened, the list read)."""
    with store.session() as s:
        audit.record(
            s,
            action,
            _actor(link.link_id),
            case_id=link.case_id,
            patient=audit.patient_of_case(s, link.case_id),
            entity=[f"upload-link:{link.link_id}", *(entity or [])],
        )


def received(store: Store, link: LinkUse) -> list[dict[str, Any]]:
    """What this link received and refused, in order: names, results, reasons; nothing of the
    case."""
    with store.session(readonly=True) as s:
        rows = s.scalars(
            select(UploadLinkFile)
            .where(UploadLinkFile.link_id == link.link_id)
            .order_by(UploadLinkFile.id)
        ).all()
        return [file_view(r) for r in rows]


def file_view(row: UploadLinkFile) -> dict[str, Any]:
    out: dict[str, Any] = {"file": row.name, "result": row.result, "kind": row.kind}
    if row.reason:
        out["reason"] = row.reason
    if row.instances:
        out["instances"] = row.instances
    return out


# --------------------------------------------------------------------------- one file


def receive(
    store: Store,
    settings: Settings,
    images: ImageStore,
    grant: UploadGrant,
    name: str,
    declared_type: str,
    path: Path,
) -> dict[str, Any]:
    """One file that arrived through a link: kept or refused (nothing stored), listed for the
    link, audited. DICOM instances wait for the `link_studies` job to reach the ImagingStudy;
    everything else is processed as any upload. Returns the link's view of the result."""
    assert grant.link_id is not None
    result = _receive(store, settings, images, grant, name, declared_type, path)
    outcome = "ignored" if result.kind == "dicomdir" else str(result.as_json()["result"])
    with store.session() as s:
        row = UploadLinkFile(
            link_id=grant.link_id,
            name=name[:1024],
            result=outcome,
            kind=result.kind[:32],
            reason=result.reason or (DICOMDIR_NOTE if outcome == "ignored" else None),
            instances=len(result.instances),
        )
        s.add(row)
        audit.record(
            s,
            "upload-link.file",
            grant.actor,
            case_id=grant.case_id,
            patient=audit.patient_of_case(s, grant.case_id),
            entity=[f"upload-link:{grant.link_id}", f"result:{outcome}", f"kind:{result.kind}"],
            outcome=audit.SUCCESS if result.accepted else audit.MINOR_FAILURE,
        )
        s.flush()
        view = file_view(row)
    log.info("upload_link.file", link_id=grant.link_id, result=outcome, kind=result.kind)
    return view


def _receive(
    store: Store,
    settings: Settings,
    images: ImageStore,
    grant: UploadGrant,
    name: str,
    declared_type: str,
    path: Path,
) -> FileResult:
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] != b"DICM":
        result = uploads.receive_file(store, settings, images, grant, name, declared_type, path)
        uploads.queue_after(store, grant.case_id, [result])
        return result
    if _is_dicomdir(path):
        return FileResult(name, True, "dicomdir")
    try:
        inst = uploads.read_instance(path)
    except InputError as exc:
        return FileResult(name, False, "dicom", exc.message, 400)
    source = uploads.upload_source(grant)
    images.add_batch(grant.case_id, [inst.item], source)
    held_count = _check_study(store, grant.case_id, source, inst)
    with store.session() as s:
        queue_studies(s, grant.case_id, source)
    return FileResult(
        name,
        True,
        "dicom",
        instances=[{"study": inst.item.study_uid, "sop": inst.item.sop_uid}],
        held=held_count,
        shas=[inst.item.sha256],
    )


def _check_study(store: Store, case_id: str, source: str, inst: uploads.Instance) -> int:
    """The identity check of the instance's study, one instance at a time: a study already held
    stays held (a later instance that matches must not clear what an earlier one failed; only
    an admin's decision does). Returns 1 when the study is held."""
    with store.session(readonly=True) as s:
        already = s.scalar(
            select(HeldItem.id).where(
                HeldItem.case_id == case_id,
                HeldItem.kind == held.STUDY,
                HeldItem.key == inst.item.study_uid,
                HeldItem.state == held.HELD,
            )
        )
    if already is not None:
        return 1
    return held.check_studies(store, case_id, source, {inst.item.study_uid: [inst.dataset]})


def _is_dicomdir(path: Path) -> bool:
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return False  # read_instance says why
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def queue_studies(session: Session, case_id: str, source: str) -> None:
    """Queue the rebuild of this source's studies, unless one is queued and not yet started
    (it will see this instance too)."""
    jobs.require_case_open(session, case_id, "queueing the uploaded studies")
    waiting = session.scalar(
        select(Job.id).where(
            Job.kind == KIND,
            Job.case_id == case_id,
            Job.state == jobs.QUEUED,
        )
    )
    if waiting is None:
        jobs.enqueue(
            session,
            KIND,
            case_id=case_id,
            payload={"source": source},
            run_at=utcnow() + SETTLE,
        )


def run_link_studies(ctx: jobs.JobContext) -> None:
    """The ImagingStudies of the instances a link uploaded, mapped again from the stored
    instances; then the case's normalisation queued."""
    assert ctx.case_id is not None
    source = str(ctx.payload["source"])
    with ctx.store.session(readonly=True) as s:
        studies = set(
            s.scalars(
                select(ImageInstance.study_uid)
                .where(ImageInstance.case_id == ctx.case_id, ImageInstance.source == source)
                .distinct()
            )
        )
    if not studies:
        return
    ctx.checkpoint("rebuilding the uploaded studies")
    with requests.Session() as http:
        images = build_image_store(ctx.settings, ctx.store, http)
        shas = uploads.rebuild_studies(
            ctx.store, ctx.settings, images, ctx.case_id, source, studies
        )
    with ctx.store.session() as s:
        documents.queue_normalise(s, ctx.case_id, shas)
    log.info("upload_link.studies", case_id=ctx.case_id, studies=len(studies), instances=len(shas))


__all__ = [
    "HEADER",
    "KIND",
    "LinkUse",
    "create_link",
    "link_url",
    "list_links",
    "receive",
    "received",
    "record_use",
    "resolve",
    "revoke_link",
    "run_link_studies",
    "token_hash",
]
