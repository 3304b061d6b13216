"""Documents of a case: every attachment pulled or file received is read by its content.

`read_document` (pure: bytes in, what the document is and holds out) identifies the content
(`mappers.content`), then: C-CDA -> the C-CDA mapper, HL7 v2 -> the v2 mapper, FHIR JSON/NDJSON
-> the resources as sent, PDF -> its text (`mappers.pdf`; a PDF without a text layer is flagged
"no text (scanned)"), plain text as is. `keep_document` stores it for a case in one transaction:
the bytes (and the extracted text) as `Binary` files, a `CaseDocument` row, and the resources
under the document's own source `urn:fhir-gateway:document:<id>` - the resources the mappers
made plus one DocumentReference for the document, whose attachments point at
`GET /cases/{id}/documents/{doc}/content` (the original) and `...?format=text` (the text).
Then the identity check (`casebundle/held.py`): the document's Patient (C-CDA recordTarget,
v2 PID, a FHIR Patient) against the referral's; a mismatch holds the whole document out.

Normalisation (`casebundle/normalise.py`) reads the document's source like any pull, with the
DocumentReference as the Provenance entity of what was mapped from it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.casebundle import held
from fhir_gateway.errors import InputError, ParseError
from fhir_gateway.resources import LOINC, Resource, codeable_concept, coding, deterministic_id
from fhir_gateway.security import audit
from fhir_gateway.security.audit import Actor
from fhir_gateway.store import Store
from fhir_gateway.store.models import Binary, Case, CaseDocument, StoredResource
from mappers import detect, pdf
from mappers.content import ContentKind, Identification, identify
from mappers.fhir import parse_fhir

log = structlog.get_logger(__name__)

SOURCE_PREFIX = "urn:fhir-gateway:document:"
PULLED, UPLOAD = "pulled", "upload"
MAPPED, STORED, FAILED = "mapped", "stored", "failed"
FLAG_SYSTEM = "urn:fhir-gateway:document-flag"
NO_TEXT_LAYER = "no-text-layer"  # meta.tag code on the DocumentReference of a scanned PDF
NORMALISE_KIND = "normalise_case"  # = casebundle.normalise.KIND (normalise imports this module)
CATEGORY_SYSTEM = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
# LOINC document types (us-core-documentreference-type): what an untyped document is taken as.
PATHOLOGY_STUDY = coding(LOINC, "11526-1", "Pathology study")
NOTE = coding(LOINC, "34109-9", "Note")
LAB_REPORT = coding(LOINC, "11502-2", "Laboratory report")
# A text that names itself a pathology report (surgical pathology, cytology, final diagnosis
# of a specimen) is typed as one, so completeness sees the pathology report it is.
_PATHOLOGY_TEXT = re.compile(
    r"\b(surgical\s+pathology|pathology\s+report|cytopathology|histopathology"
    r"|final\s+(pathologic\s+)?diagnosis)\b",
    re.IGNORECASE,
)
# Kinds a case keeps as documents (DICOM goes to the image store instead).
DOCUMENT_KINDS = frozenset(
    {
        ContentKind.PDF,
        ContentKind.CCDA,
        ContentKind.HL7V2,
        ContentKind.FHIR_JSON,
        ContentKind.FHIR_NDJSON,
        ContentKind.TEXT,
    }
)


def source_of(document_id: str) -> str:
    return f"{SOURCE_PREFIX}{document_id}"


def document_id(case_id: str, sha256: str) -> str:
    return deterministic_id("document", case_id, sha256)


def content_url(base_url: str, case_id: str, doc_id: str, text: bool = False) -> str:
    url = f"{base_url.rstrip('/')}/cases/{case_id}/documents/{doc_id}/content"
    return url + ("?format=text" if text else "")


# --------------------------------------------------------------------------- reading (pure)


@dataclass
class ReadDocument:
    """What a document is (by content) and what it holds."""

    ident: Identification
    resources: list[Resource] = field(default_factory=list)  # mapped, or FHIR as sent
    issues: list[dict[str, Any]] = field(default_factory=list)
    text: str | None = None  # PDF text layer, or the plain text
    no_text_layer: bool = False
    mapped_docref: bool = False  # the mapper made the document's DocumentReference (C-CDA)

    @property
    def kind(self) -> ContentKind:
        return self.ident.kind


def read_document(data: bytes, declared_type: str | None, source: str) -> ReadDocument:
    """Identify `data` by content and read it with the mapper of its kind.

    Raises:
        InputError: unusable (not a supported kind, not well-formed, unmappable).
    """
    ident = identify(data, declared_type)
    found = ReadDocument(ident)
    if ident.kind not in DOCUMENT_KINDS:
        raise ParseError(
            f"unsupported content ({ident.kind.value}{': ' + ident.detail if ident.detail else ''})"
            ": send PDF, C-CDA, HL7 v2, FHIR JSON/NDJSON, plain text or DICOM",
            source="document",
        )
    if ident.kind == ContentKind.PDF:
        extracted = pdf.document_to_text(pdf.parse_pdf(data))
        found.text, found.no_text_layer = extracted.text, extracted.no_text_layer
        if extracted.no_text_layer:
            found.issues.append(
                _issue("warning", "incomplete", "no text (scanned): the PDF has no text layer")
            )
        elif extracted.partly_scanned:
            pages = ",".join(str(p) for p in extracted.pages_without_text)
            found.issues.append(
                _issue("information", "incomplete", f"PDF pages without text (scanned): {pages}")
            )
    elif ident.kind == ContentKind.TEXT:
        found.text = _decode_text(data)
    elif ident.kind in (ContentKind.FHIR_JSON, ContentKind.FHIR_NDJSON):
        found.resources = [item.resource for item in parse_fhir(data)]
    else:  # C-CDA, HL7 v2: the mappers, through the one dispatch
        result = detect.map_document(data, "", source)
        found.resources, found.issues = result.resources, list(result.issues)
        found.mapped_docref = ident.kind == ContentKind.CCDA and any(
            r["resourceType"] == "DocumentReference" for r in found.resources
        )
    return found


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _issue(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    return {"severity": severity, "code": code, "diagnostics": diagnostics}


def document_type(found: ReadDocument, attached: Resource | None) -> dict[str, Any]:
    """The DocumentReference.type: the pulled resource's own (DocumentReference.type,
    DiagnosticReport.code), else pathology when the text says so, else by kind."""
    if attached is not None:
        concept = attached.get("type") or attached.get("code")
        if isinstance(concept, dict) and concept:
            return concept
    if found.text and _PATHOLOGY_TEXT.search(found.text[:20_000]):
        return codeable_concept(PATHOLOGY_STUDY)
    if found.kind == ContentKind.HL7V2:
        return codeable_concept(LAB_REPORT)
    return codeable_concept(NOTE)


def document_reference(
    doc: CaseDocument,
    found: ReadDocument,
    *,
    base_url: str,
    subject: str,
    attached: Resource | None = None,
    title: str = "",
) -> Resource:
    """The DocumentReference of a document, its attachments served by the gateway (US Core
    DocumentReference: type, category, subject, content.attachment with url; UC-20)."""
    content: list[dict[str, Any]] = [
        {
            "attachment": {
                "contentType": doc.content_type,
                "url": content_url(base_url, doc.case_id, doc.id),
                "size": doc.size,
                **({"title": title} if title else {}),
            }
        }
    ]
    if doc.text_sha256 is not None and doc.kind == ContentKind.PDF:
        content.append(
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "url": content_url(base_url, doc.case_id, doc.id, text=True),
                    "title": "text extracted from the PDF",
                }
            }
        )
    resource: Resource = {
        "resourceType": "DocumentReference",
        "id": doc.id,
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{doc.id}"}],
        "status": "current",
        "type": document_type(found, attached),
        "category": [codeable_concept(coding(CATEGORY_SYSTEM, "clinical-note", "Clinical Note"))],
        "subject": {"reference": subject},
        "content": content,
    }
    date = (attached or {}).get("date") or (attached or {}).get("issued")
    if isinstance(date, str):
        resource["date"] = date
    if doc.no_text_layer:
        resource["meta"] = {
            "tag": [{"system": FLAG_SYSTEM, "code": NO_TEXT_LAYER, "display": "no text (scanned)"}]
        }
        resource["description"] = "no text (scanned)"
    return resource


# --------------------------------------------------------------------------- storing


def binary_dir(data_dir: Path) -> Path:
    """Where pulled attachments and uploaded documents are kept, by SHA-256 (records/pull.py)."""
    return data_dir / "binaries"


def write_binary(data_dir: Path, data: bytes) -> str:
    """Store bytes by SHA-256 (atomic rename; the same bytes twice are one file)."""
    sha = hashlib.sha256(data).hexdigest()
    root = binary_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / sha
    if not final.exists():
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".part-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, final)
    return sha


@dataclass(frozen=True)
class Kept:
    """A document kept for a case."""

    document_id: str
    kind: str
    status: str
    held: int
    new: bool
    no_text_layer: bool = False


def case_patient_ref(case: Case) -> str:
    """What a document without a Patient of its own is about: the referral's patient."""
    if case.patient_ref.startswith("Patient/"):
        return case.patient_ref
    return f"Patient/{deterministic_id('case', case.id)}"  # = normalise.case_patient_id


def keep_document(
    store: Store,
    data_dir: Path,
    base_url: str,
    case_id: str,
    data: bytes,
    found: ReadDocument | None,
    *,
    origin: str,
    source: str,
    declared_type: str,
    actor: Actor,
    attached_to: str | None = None,
    attached: Resource | None = None,
    title: str = "",
    failure: str | None = None,
) -> Kept:
    """Store a document read by `read_document` (or, with `found` None, one that could not be
    read: kept as received with `failure` as the reason) and check whose it is.

    Raises:
        CaseClosedError: the case was cancelled or rejected (nothing is written).
    """
    sha = write_binary(data_dir, data)
    doc_id = document_id(case_id, sha)
    source_doc = source_of(doc_id)
    ident = found.ident if found is not None else identify(data, declared_type)
    text_sha = None
    if (
        found is not None
        and found.text
        and not found.no_text_layer
        and ident.kind == ContentKind.PDF
    ):
        text_sha = write_binary(data_dir, found.text.encode("utf-8"))
    with store.session() as s:
        jobs.require_case_open(s, case_id, "keeping a document")
        case = s.get(Case, case_id)
        assert case is not None  # require_case_open raised otherwise
        row = s.get(CaseDocument, doc_id)
        new = row is None
        if row is None:
            row = CaseDocument(
                id=doc_id,
                case_id=case_id,
                sha256=sha,
                size=len(data),
                kind=ident.kind.value,
                content_type=ident.media_type,
                declared_type=ident.declared_type,
                origin=origin,
                source=source,
                attached_to=attached_to,
                text_sha256=text_sha,
                no_text_layer=bool(found and found.no_text_layer),
                status=FAILED if found is None else (MAPPED if found.resources else STORED),
                detail=failure,
            )
            s.add(row)
            for digest, size, ctype in (
                (sha, len(data), ident.media_type),
                *([(text_sha, 0, "text/plain; charset=utf-8")] if text_sha else []),
            ):
                if digest:
                    _add_binary(s, digest, size, ctype)
            s.flush()
            _save_resources(s, row, found, base_url, case, attached, title)
        audit.record(
            s,
            "document.receive" if origin == UPLOAD else "document.read-in",
            actor,
            case_id=case_id,
            patient=audit.patient_of_case(s, case_id),
            entity=[f"document:{doc_id}", f"kind:{ident.kind.value}", f"origin:{origin}"],
        )
        requested = case_patient_ref(case).split("/", 1)[1]
    count = held.check_records(store, case_id, source_doc, requested) if new else 0
    log.info(
        "documents.kept",
        case_id=case_id,
        document_id=doc_id,
        kind=ident.kind.value,
        origin=origin,
        new=new,
        held=count,
        resources=len(found.resources) if found else 0,
    )
    return Kept(doc_id, ident.kind.value, row.status, count, new, row.no_text_layer)


def _add_binary(session: Session, sha: str, size: int, content_type: str) -> None:
    """The Binary row of a file, once: Binary rows are shared by every case, so two cases
    receiving the same file at once race here; the loser's insert is undone (a savepoint)."""
    if session.get(Binary, sha) is not None:
        return
    try:
        with session.begin_nested():
            session.add(Binary(sha256=sha, size=size, content_type=content_type))
    except IntegrityError:
        pass  # the other transaction stored it


def _save_resources(
    session: Session,
    doc: CaseDocument,
    found: ReadDocument | None,
    base_url: str,
    case: Case,
    attached: Resource | None,
    title: str,
) -> None:
    """The document's resources under its own source: what was mapped, and its
    DocumentReference (the C-CDA mapper's own, given the gateway's attachment first)."""
    source = source_of(doc.id)
    resources = list(found.resources) if found is not None else []
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    subject = (
        f"Patient/{patients[0]['id']}"
        if len(patients) == 1 and patients[0].get("id")
        else case_patient_ref(case)
    )
    reading = found or ReadDocument(identify(b"", None))
    own = document_reference(
        doc, reading, base_url=base_url, subject=subject, attached=attached, title=title
    )
    if found is not None and found.mapped_docref:
        mapped = next(r for r in resources if r["resourceType"] == "DocumentReference")
        mapped["content"] = [own["content"][0], *(mapped.get("content") or [])]
        mapped.setdefault("identifier", []).append(own["identifier"][0])
        doc_ref = mapped
    else:
        resources.append(own)
        doc_ref = own
    for index, resource in enumerate(resources):
        rid = str(resource.get("id") or f"r{index}")
        session.add(
            StoredResource(
                case_id=doc.case_id,
                source=source,
                resource_type=resource["resourceType"],
                source_id=rid,
                body=resource,
                last_updated=None,
            )
        )
    doc.attached_to = doc.attached_to or None
    session.flush()
    log.debug("documents.resources", document_id=doc.id, docref=str(doc_ref.get("id")))


# --------------------------------------------------------------------------- pulled documents


def read_in_pulled(
    store: Store,
    data_dir: Path,
    base_url: str,
    case_id: str,
    source: str,
    binaries: Iterable[tuple[str, str, str]],
    resources: Iterable[Resource],
) -> list[Kept]:
    """Read every attachment a pull fetched (`(sha256, content type, "Type/id")`): each becomes
    a document of the case. One that cannot be read is kept as received, with the reason."""
    by_ref = {f"{r['resourceType']}/{r.get('id')}": r for r in resources}
    kept: list[Kept] = []
    for sha, content_type, where in binaries:
        path = binary_dir(data_dir) / sha
        if not path.exists():
            continue
        data = path.read_bytes()
        failure = None
        found: ReadDocument | None
        try:
            found = read_document(data, content_type, source_of(document_id(case_id, sha)))
        except InputError as exc:
            found, failure = None, exc.message
        kept.append(
            keep_document(
                store,
                data_dir,
                base_url,
                case_id,
                data,
                found,
                origin=PULLED,
                source=source,
                declared_type=content_type,
                actor=audit.SYSTEM,
                attached_to=where,
                attached=by_ref.get(where),
                failure=failure,
            )
        )
    return kept


def list_documents(session: Session, case_id: str) -> list[CaseDocument]:
    return list(
        session.scalars(
            select(CaseDocument)
            .where(CaseDocument.case_id == case_id)
            .order_by(CaseDocument.created_at, CaseDocument.id)
        )
    )


def document_view(row: CaseDocument, base_url: str) -> dict[str, Any]:
    """A document as JSON (ids, kinds and links only)."""
    return {
        "id": row.id,
        "kind": row.kind,
        "contentType": row.content_type,
        "size": row.size,
        "origin": row.origin,
        "status": row.status,
        "noTextLayer": row.no_text_layer,
        "attachedTo": row.attached_to,
        "content": content_url(base_url, row.case_id, row.id),
        "text": content_url(base_url, row.case_id, row.id, text=True)
        if row.text_sha256 or row.kind == ContentKind.TEXT
        else None,
    }


def queue_normalise(session: Session, case_id: str, shas: Iterable[str]) -> None:
    """Queue the case's normalisation after documents or images arrived: once per set of
    contents (the same upload again queues nothing new). Under the case's lock, so two
    requests queueing the same key at once do not race on the dedup key."""
    jobs.require_case_open(session, case_id, "queueing normalisation")
    digest = hashlib.sha256("\n".join(sorted(shas)).encode()).hexdigest()[:32]
    key = f"normalise:{case_id}:received:{digest}"
    jobs.enqueue(session, NORMALISE_KIND, case_id=case_id, payload={"key": key}, dedup_key=key)


__all__ = [
    "SOURCE_PREFIX",
    "Kept",
    "ReadDocument",
    "binary_dir",
    "content_url",
    "document_id",
    "document_reference",
    "keep_document",
    "list_documents",
    "queue_normalise",
    "read_document",
    "read_in_pulled",
    "source_of",
]
