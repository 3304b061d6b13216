"""Files uploaded into a case (document upload, STOW-RS, tus): each read by its content and kept,
or rejected with the reason and nothing stored.

- documents (PDF, C-CDA, HL7 v2, FHIR JSON/NDJSON, plain text) -> `records.documents`;
- DICOM Part 10 instances -> the image store, the identity check per study, ImagingStudy
  resources of the case under the uploader's source;
- a DICOM CD or folder as a `.zip` -> read through its DICOMDIR (`pydicom.fileset.FileSet`),
  or, without one, by scanning every member for a Part 10 preamble; each instance as above.

Everything kept queues the case's normalisation (deduplicated by content).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pydicom
import structlog
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet

from connectors.dicomweb import RetrievedInstance
from fhir_gateway import jobs
from fhir_gateway.casebundle import held
from fhir_gateway.errors import InputError, PayloadTooLargeError
from fhir_gateway.imaging.job import case_dicomweb_url, save_imaging_studies
from fhir_gateway.imaging.store import ImageStore
from fhir_gateway.records import documents
from fhir_gateway.security.audit import Actor
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Case
from mappers.content import identify
from mappers.dicom import datasets_to_imaging_studies

log = structlog.get_logger(__name__)

ZIP_MAGIC = b"PK\x03\x04"
ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/x-zip"})
COPY_CHUNK = 1 << 20
# PS3.4 Table GG.4-1 / PS3.18 STOW failure reasons used here.
FAILURE_PROCESSING = 0x0110  # Processing failure
FAILURE_NOT_UNDERSTOOD = 0xC000  # Cannot understand (not a DICOM Part 10 instance)
FAILURE_STUDY_MISMATCH = 0xA900  # Data Set does not match SOP Class / the study in the URL


@dataclass(frozen=True)
class UploadGrant:
    """Who may upload into which case: a partner's EHR (its own cases), an admin, or a patient
    upload link scoped to one case (`records.upload_links`). The API's dependencies produce it;
    the step trusts it."""

    case_id: str
    actor: Actor
    source: str  # recorded as the source of what is uploaded (e.g. the partner id)
    link_id: str | None = None  # set when the grant comes from a patient upload link


@dataclass
class FileResult:
    """The answer for one uploaded file."""

    name: str
    accepted: bool
    kind: str = ""
    reason: str = ""
    status: int = 200  # the HTTP status this file alone would have had
    document: str | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)  # SOP uids stored
    failed: list[dict[str, Any]] = field(default_factory=list)  # SOP uids/parts refused
    held: int = 0
    flags: list[str] = field(default_factory=list)
    shas: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.name,
            "result": "accepted" if self.accepted else "rejected",
            "kind": self.kind,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.document:
            out["document"] = self.document
        if self.instances:
            out["instances"] = len(self.instances)
            out["studies"] = sorted({i["study"] for i in self.instances})
        if self.failed:
            out["failedInstances"] = len(self.failed)
        if self.held:
            out["held"] = self.held
        if self.flags:
            out["flags"] = self.flags
        return out


# --------------------------------------------------------------------------- DICOM instances


@dataclass(frozen=True)
class Instance:
    """A verified Part 10 file and the header it was read by."""

    item: RetrievedInstance
    dataset: pydicom.Dataset


def read_instance(path: Path, study_uid: str | None = None) -> Instance:
    """Read a Part 10 file's header; its SHA-256 is computed in one streaming pass.

    Raises:
        InputError: not DICOM Part 10, a required UID missing, or another study than `study_uid`.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InputError(f"not a DICOM Part 10 instance ({type(exc).__name__})") from exc
    meta = getattr(ds, "file_meta", None)
    uids = {
        "StudyInstanceUID": ds.get("StudyInstanceUID"),
        "SeriesInstanceUID": ds.get("SeriesInstanceUID"),
        "SOPInstanceUID": ds.get("SOPInstanceUID"),
        "SOPClassUID": ds.get("SOPClassUID"),
        "TransferSyntaxUID": meta.get("TransferSyntaxUID") if meta is not None else None,
    }
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise InputError(f"DICOM instance without {', '.join(missing)}")
    if study_uid is not None and str(uids["StudyInstanceUID"]) != study_uid:
        raise InputError("instance of another study than the one in the URL")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(COPY_CHUNK):
            digest.update(chunk)
    item = RetrievedInstance(
        path=path,
        sha256=digest.hexdigest(),
        size=path.stat().st_size,
        study_uid=str(uids["StudyInstanceUID"]),
        series_uid=str(uids["SeriesInstanceUID"]),
        sop_uid=str(uids["SOPInstanceUID"]),
        sop_class_uid=str(uids["SOPClassUID"]),
        transfer_syntax_uid=str(uids["TransferSyntaxUID"]),
    )
    return Instance(item, ds)


def keep_instances(
    store: Store,
    settings: Settings,
    images: ImageStore,
    grant: UploadGrant,
    instances: Sequence[Instance],
) -> int:
    """Into the image store; the identity check per study; the ImagingStudies of these studies
    saved under the uploader's source. Returns how many studies are held.

    Raises:
        CaseClosedError: the case was cancelled or rejected.
    """
    if not instances:
        return 0
    source = upload_source(grant)
    images.add_batch(grant.case_id, [i.item for i in instances], source)
    headers: dict[str, list[pydicom.Dataset]] = {}
    for inst in instances:
        series = headers.setdefault(inst.item.study_uid, [])
        if all(d.SeriesInstanceUID != inst.dataset.SeriesInstanceUID for d in series):
            series.append(inst.dataset)
    held_count = held.check_studies(store, grant.case_id, source, headers)
    rebuild_studies(store, settings, images, grant.case_id, source, set(headers))
    return held_count


def rebuild_studies(
    store: Store,
    settings: Settings,
    images: ImageStore,
    case_id: str,
    source: str,
    study_uids: set[str],
) -> list[str]:
    """The ImagingStudies of `study_uids` mapped again from every stored instance of them and
    saved under `source`. Returns the SHA-256 of those instances.

    Raises:
        CaseClosedError: the case was cancelled or rejected.
    """
    with store.session(readonly=True) as s:
        case = s.get(Case, case_id)
        subject = {"reference": case.patient_ref} if case is not None else {}
    stored = [
        ref
        for ref in images.iter_instances(case_id, include_held=True)
        if ref.study_uid in study_uids
    ]
    datasets = []
    for ref in stored:
        with images.open_instance(ref) as fh:
            datasets.append(pydicom.dcmread(fh, stop_before_pixels=True))
    resources = datasets_to_imaging_studies(datasets, subject, case_dicomweb_url(settings, case_id))
    save_imaging_studies(store, case_id, source, resources)
    return [ref.sha256 for ref in stored]


def upload_source(grant: UploadGrant) -> str:
    return f"urn:fhir-gateway:upload:{grant.source}"


# --------------------------------------------------------------------------- one file


def receive_file(
    store: Store,
    settings: Settings,
    images: ImageStore,
    grant: UploadGrant,
    name: str,
    declared_type: str,
    path: Path,
) -> FileResult:
    """Read one uploaded file (already on disk at `path`, which is consumed) and keep it, or
    reject it with the reason (nothing stored). Documents are read into memory up to the
    document limit; DICOM and zip files are read from disk."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    size = path.stat().st_size
    is_zip = head.startswith(ZIP_MAGIC)
    if is_zip or documents_normal(declared_type) in ZIP_TYPES:
        if not is_zip:
            return FileResult(name, False, "zip", "declared application/zip but is not a zip")
        return _receive_zip(store, settings, images, grant, name, path)
    if head[128:132] == b"DICM":  # DICOM Part 10: read from disk, never into memory
        try:
            inst = read_instance(path)
        except InputError as exc:
            return FileResult(name, False, "dicom", exc.message, 400)
        held_count = keep_instances(store, settings, images, grant, [inst])
        return FileResult(
            name,
            True,
            "dicom",
            instances=[_instance_json(inst.item)],
            held=held_count,
            shas=[inst.item.sha256],
        )
    limit = settings.limits.max_document_bytes
    if size > limit:
        kind = identify(head, declared_type).kind.value
        return FileResult(name, False, kind, f"document over the {limit}-byte limit", 413)
    data = path.read_bytes()
    return receive_document(store, settings, grant, name, declared_type, data)


def documents_normal(declared_type: str) -> str:
    return declared_type.split(";")[0].strip().lower()


def receive_document(
    store: Store,
    settings: Settings,
    grant: UploadGrant,
    name: str,
    declared_type: str,
    data: bytes,
) -> FileResult:
    """A document upload: read (pure) first, so a rejected file stores nothing."""
    ident = identify(data, declared_type)
    if ident.mismatch:
        return FileResult(
            name,
            False,
            ident.kind.value,
            f"declared as {ident.declared_type} but the content is {ident.kind.value}",
            415,
        )
    try:
        found = documents.read_document(data, declared_type, upload_source(grant))
    except PayloadTooLargeError as exc:
        return FileResult(name, False, ident.kind.value, exc.message, 413)
    except InputError as exc:
        status = 415 if ident.kind not in documents.DOCUMENT_KINDS else 422
        return FileResult(name, False, ident.kind.value, exc.message, status)
    kept = documents.keep_document(
        store,
        settings.data_dir,
        settings.base_url,
        grant.case_id,
        data,
        found,
        origin=documents.UPLOAD,
        source=upload_source(grant),
        declared_type=declared_type,
        actor=grant.actor,
        title=name,
    )
    flags = ["no text (scanned)"] if kept.no_text_layer else []
    return FileResult(
        name,
        True,
        kept.kind,
        document=kept.document_id,
        held=kept.held,
        flags=flags,
        shas=[hashlib.sha256(data).hexdigest()],
    )


def _instance_json(item: RetrievedInstance) -> dict[str, Any]:
    return {
        "study": item.study_uid,
        "series": item.series_uid,
        "sop": item.sop_uid,
        "sopClass": item.sop_class_uid,
    }


# --------------------------------------------------------------------------- DICOM CD (.zip)


def _receive_zip(
    store: Store,
    settings: Settings,
    images: ImageStore,
    grant: UploadGrant,
    name: str,
    path: Path,
) -> FileResult:
    try:
        with images.staging() as staging, _unpacked(path, staging, settings) as root:
            files, how = dicom_files_of(root)
            instances: list[Instance] = []
            failed: list[dict[str, Any]] = []
            for f in files:
                try:
                    instances.append(read_instance(f))
                except InputError as exc:
                    failed.append({"member": f.relative_to(root).as_posix(), "reason": exc.message})
            if not instances:
                return FileResult(name, False, "zip", f"no DICOM instance found ({how})", 422)
            held_count = keep_instances(store, settings, images, grant, instances)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        return FileResult(name, False, "zip", f"not a readable zip ({type(exc).__name__})", 422)
    except PayloadTooLargeError as exc:
        return FileResult(name, False, "zip", exc.message, 413)
    log.info(
        "uploads.zip.read",
        case_id=grant.case_id,
        via=how,
        instances=len(instances),
        failed=len(failed),
    )
    return FileResult(
        name,
        True,
        "dicom-zip",
        instances=[_instance_json(i.item) for i in instances],
        failed=failed,
        held=held_count,
        flags=[f"read via {how}"],
        shas=[i.item.sha256 for i in instances],
    )


@contextmanager
def _unpacked(path: Path, staging: Path, settings: Settings) -> Iterator[Path]:
    """The zip unpacked under `staging` (members outside it refused, sizes limited)."""
    root = Path(tempfile.mkdtemp(prefix="zip-", dir=staging))
    limits = settings.limits
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > limits.max_zip_members:
                raise PayloadTooLargeError(
                    f"zip has {len(members)} files; the limit is {limits.max_zip_members}"
                )
            total = 0
            for member in members:
                rel = PurePosixPath(member.filename.replace("\\", "/"))
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    continue  # zip slip: never written outside the staging directory
                target = root.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, target.open("wb") as out:
                    total += _copy_limited(src, out, limits.max_zip_bytes - total)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _copy_limited(src: IO[bytes], out: IO[bytes], budget: int) -> int:
    copied = 0
    while chunk := src.read(COPY_CHUNK):
        copied += len(chunk)
        if copied > budget:
            raise PayloadTooLargeError("zip unpacks to more than the configured limit")
        out.write(chunk)
    return copied


def dicom_files_of(root: Path) -> tuple[list[Path], str]:
    """The instance files of an unpacked CD: those its DICOMDIR references (PS3.10 File-set,
    read with pydicom's FileSet), else every file with a Part 10 preamble."""
    dicomdir = next(
        (p for p in sorted(root.rglob("*")) if p.is_file() and p.name.upper() == "DICOMDIR"), None
    )
    if dicomdir is not None:
        try:
            fs = FileSet(pydicom.dcmread(dicomdir))
        except (InvalidDicomError, ValueError, KeyError, AttributeError, OSError):
            fs = None
        if fs is not None:
            base = dicomdir.parent
            files = []
            try:
                for instance in fs:
                    candidate = base.joinpath(*instance.ReferencedFileID)
                    if candidate.is_file():
                        files.append(candidate)
            finally:
                close_fileset(fs)
            if files:
                return files, "DICOMDIR"
    return [p for p in sorted(root.rglob("*")) if p.is_file() and _is_part10(p)], "scan"


def close_fileset(fs: FileSet) -> None:
    """Remove the staging directory every FileSet makes (pydicom 3 offers no close())."""
    stage = getattr(fs, "_stage", {}).get("t")
    if stage is not None:
        stage.cleanup()


def _is_part10(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


# --------------------------------------------------------------------------- many files


def receive_files(
    store: Store,
    settings: Settings,
    images: ImageStore,
    grant: UploadGrant,
    files: Iterable[tuple[str, str, Path]],
) -> list[FileResult]:
    """Every uploaded file `(name, declared type, path)`; then the normalisation queued once."""
    results = [
        receive_file(store, settings, images, grant, name, ctype, path)
        for name, ctype, path in files
    ]
    queue_after(store, grant.case_id, results)
    return results


def queue_after(store: Store, case_id: str, results: Sequence[FileResult]) -> None:
    shas = [sha for r in results if r.accepted for sha in r.shas]
    if not shas:
        return
    with store.session() as s:
        jobs.require_case_open(s, case_id, "queueing normalisation")
        documents.queue_normalise(s, case_id, shas)


__all__ = [
    "FileResult",
    "Instance",
    "UploadGrant",
    "dicom_files_of",
    "keep_instances",
    "queue_after",
    "read_instance",
    "rebuild_studies",
    "receive_document",
    "receive_file",
    "receive_files",
    "upload_source",
]
