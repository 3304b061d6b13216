"""Per-case DICOMweb for reviewers and viewers: `/cases/{case_id}/dicom-web` (DICOM PS3.18).

QIDO-RS (studies / series / instances, DICOM JSON), WADO-RS (study / series / instance as
`multipart/related; type="application/dicom"` with the stored bytes, metadata, native frames),
rendered instances and frames (JPEG/PNG, windowed) and thumbnails of studies, series, instances
and frames (`imaging/render.py`).
Only the case's own instances (the image store's index rows) are visible; anything else is 404.
Every search, retrieve, rendered image and thumbnail writes an audit row (`images.search` /
`images.retrieve`).

The serving functions take any `InstanceSource` (the image store, or the sandbox PACS's folder),
so `fhir_gateway.sandbox.pacs` answers exactly as this router does, without auth and audit.
"""

from __future__ import annotations

import asyncio
import fnmatch
import io
import json
import mmap
import os
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO, Protocol
from urllib.parse import urlsplit

import requests
import structlog
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID

from fhir_gateway.api.deps import STAFF_READER, StoreDep
from fhir_gateway.errors import InputError, NotAcceptableError, NotFoundError
from fhir_gateway.imaging import render
from fhir_gateway.imaging.job import build_image_store
from fhir_gateway.imaging.store import ImageStore, InstanceRef, read_dataset
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store

log = structlog.get_logger(__name__)

DICOM_JSON = "application/dicom+json"
# WADO-RS bodies are read in batches of whole parts of about this size, each batch by one worker
# thread while the previous one is sent (no thread hop per small chunk).
BATCH = 8 << 20
Json = dict[str, Any]

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
MODALITY, MODALITIES_IN_STUDY = "00080060", "00080061"
RETRIEVE_URL = "00081190"
# Default return attributes (PS3.18 Tables 10.6.3-3, -4 and -5), as hex tags.
STUDY_FIELDS = [
    "00080005",
    "00080020",
    "00080030",
    "00080050",
    "00080061",
    "00080090",
    "00081030",
    "00100010",
    "00100020",
    "00100030",
    "00100040",
    "0020000D",
    "00200010",
    "00201206",
    "00201208",
    "00081190",
]
SERIES_FIELDS = [
    "00080005",
    "00080060",
    "00080021",
    "00080031",
    "0008103E",
    "0020000D",
    "0020000E",
    "00200011",
    "00201209",
    "00081190",
]
INSTANCE_FIELDS = [
    "00080005",
    "00080016",
    "00080018",
    "0020000D",
    "0020000E",
    "00200013",
    "00280008",
    "00280010",
    "00280011",
    "00280100",
    "00081190",
]
CONTROL_PARAMS = {"limit", "offset", "includefield", "fuzzymatching"}
MAX_LIMIT = 1000
_COUNT_RE = re.compile(r"[0-9]{1,9}")


class InstanceSource(Protocol):
    """What the DICOMweb service reads: `ImageStore` satisfies it."""

    def iter_instances(
        self,
        case_id: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
        *,
        with_metadata: bool = False,
    ) -> Iterator[InstanceRef]: ...

    def iter_series(
        self, case_id: str, study_uid: str | None = None, series_uid: str | None = None
    ) -> Iterator[tuple[InstanceRef, int]]: ...

    def open_instance(self, ref: InstanceRef) -> BinaryIO: ...

    def metadata(self, ref: InstanceRef) -> dict[str, Any]: ...


# --- QIDO-RS ------------------------------------------------------------------------------


def _tag(key: str) -> str:
    """`PatientID` or `00100020` -> `00100020`.

    Raises:
        InputError: not a DICOM attribute.
    """
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        return key.upper()
    tag = tag_for_keyword(key)
    if tag is None:
        raise InputError(f"unknown DICOM attribute {key!r} in the query", expression=[key])
    return f"{tag:08X}"


def _values(dataset: Json, tag: str) -> list[str]:
    out = []
    for v in (dataset.get(tag) or {}).get("Value") or []:
        if isinstance(v, dict):  # PN: {"Alphabetic": ...}
            out += [str(x) for x in v.values()]
        else:
            out.append(str(v))
    return out


def _vr(tag: str) -> str:
    try:
        return str(dictionary_VR(int(tag, 16)))
    except KeyError:
        return ""


def _matches(dataset: Json, tag: str, wanted: str) -> bool:
    """PS3.4 C.2.2.2 matching: UID lists, DA/TM ranges, `*`/`?` wildcards, else single value."""
    have = _values(dataset, tag)
    vr = _vr(tag)
    if vr == "UI":
        options = {u.strip() for u in wanted.replace("\\", ",").split(",") if u.strip()}
        return any(h in options for h in have)
    if vr in ("DA", "TM", "DT") and "-" in wanted:
        low, _, high = wanted.partition("-")
        return any((not low or h >= low) and (not high or h <= high) for h in have)
    if "*" in wanted or "?" in wanted:
        return any(fnmatch.fnmatchcase(h, wanted) for h in have)
    if "," in wanted and vr == "CS":
        return any(h in wanted.split(",") for h in have)
    return wanted in have


def _query(params: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], set[str], int, int]:
    """(match keys as tags, includefield tags or {"all"}, limit, offset) of a QIDO query."""
    matches, include = [], set()
    limit, offset = MAX_LIMIT, 0
    for key, value in params:
        if key == "includefield":
            for item in value.split(","):
                if item.strip():
                    include.add("all" if item.strip() == "all" else _tag(item.strip()))
        elif key in ("limit", "offset"):
            number = _count_param(key, value)
            if key == "limit":
                limit = min(number, MAX_LIMIT)
            else:
                offset = number
        elif key not in CONTROL_PARAMS and value != "":
            matches.append((_tag(key), value))
    return matches, include, limit, offset


def _count_param(key: str, value: str) -> int:
    """`limit` / `offset` (PS3.18 8.3.4.4: unsigned integers), ASCII digits, at most 9 of them.

    Raises:
        InputError: anything else (`²` is a digit to `str.isdigit`, not to us).
    """
    if not _COUNT_RE.fullmatch(value):
        raise InputError(
            f"{key} must be a non-negative integer of at most 9 digits", expression=[key]
        )
    return int(value)


def _put(dataset: Json, tag: str, vr: str, values: list[Any]) -> None:
    dataset[tag] = {"vr": vr, "Value": values} if values else {"vr": vr}


def _pick(full: Json, fields: Iterable[str], include: set[str]) -> Json:
    if "all" in include:
        return dict(full)
    wanted = set(fields) | include
    return {t: full[t] for t in sorted(full) if t in wanted}


def search(
    source: InstanceSource,
    scope: str,
    root_url: str,
    level: str,
    params: Sequence[tuple[str, str]],
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> tuple[list[Json], int]:
    """QIDO-RS at `level` (studies | series | instances); (page of results, total matches).

    Study and series attributes come from one instance each (plus the counts computed from
    the index); instance attributes from each instance's header.
    """
    matches, include, limit, offset = _query(params)
    # Per key: each series' first instance and its instance count (instances: itself, 1).
    groups: dict[tuple[str, ...], list[tuple[InstanceRef, int]]] = {}
    if level == "instances":
        for ref in source.iter_instances(scope, study_uid, series_uid, with_metadata=True):
            groups[(ref.study_uid, ref.series_uid, ref.sop_uid)] = [(ref, 1)]
    else:
        for ref, count in source.iter_series(scope, study_uid, series_uid):
            series_key = ref.series_uid if level == "series" else ""
            groups.setdefault((ref.study_uid, series_key), []).append((ref, count))
    results: list[Json] = []
    for key, members in groups.items():
        full = _group_attributes(source, level, members)
        url = f"{root_url}/studies/{key[0]}"
        if level != "studies":
            url += f"/series/{key[1]}"
        if level == "instances":
            url += f"/instances/{key[2]}"
        _put(full, RETRIEVE_URL, "UR", [url])
        if all(_level_match(full, level, tag, value) for tag, value in matches):
            fields = {"studies": STUDY_FIELDS, "series": SERIES_FIELDS}.get(level, INSTANCE_FIELDS)
            results.append(_pick(full, fields, include))
    return results[offset : offset + limit], len(results)


def _level_match(full: Json, level: str, tag: str, value: str) -> bool:
    if level == "studies" and tag == MODALITY:  # Modality at study level: ModalitiesInStudy
        tag = MODALITIES_IN_STUDY
    return _matches(full, tag, value)


def _group_attributes(
    source: InstanceSource, level: str, members: list[tuple[InstanceRef, int]]
) -> Json:
    """Attributes of the group's first instance, plus the counts (`members`: its series' first
    instances with their counts)."""
    full = dict(source.metadata(members[0][0]))
    if level == "studies":
        modalities = sorted(
            {m for ref, _ in members for m in _values(source.metadata(ref), MODALITY)}
        )
        _put(full, MODALITIES_IN_STUDY, "CS", modalities)
        _put(full, "00201206", "IS", [len(members)])
        _put(full, "00201208", "IS", [sum(count for _, count in members)])
    elif level == "series":
        _put(full, "00201209", "IS", [members[0][1]])
    return full


# --- WADO-RS ------------------------------------------------------------------------------


def _accept_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for item in accept.split(","):
        mtype, *params = item.split(";")
        named = {}
        for p in params:
            name, _, value = p.strip().partition("=")
            named[name.strip().lower()] = value.strip().strip('"')
        out.append((mtype.strip().lower(), named))
    return out


def check_accept(accept: str, part_type: str, syntaxes: set[str]) -> None:
    """Serve the stored bytes only if the caller accepts them (we never transcode).

    Raises:
        NotAcceptableError: no acceptable media range (406).
    """
    if not accept.strip():
        return
    for mtype, params in _accept_ranges(accept):
        if mtype in ("*/*", "multipart/*"):
            return
        if mtype != "multipart/related":
            continue
        if params.get("type", part_type) not in (part_type, "*/*", "application/*"):
            continue
        wanted = params.get("transfer-syntax", "*")
        if wanted == "*" or syntaxes <= {wanted}:
            return
        if part_type == "application/dicom" and wanted == "1.2.840.10008.1.2.1":
            # PS3.18 8.7.3.5.2 default for application/dicom; served only when stored so.
            continue
    raise NotAcceptableError(
        f"cannot serve {accept!r}: instances are served as stored "
        f'(multipart/related; type="{part_type}"; transfer-syntax=* or one of '
        f"{', '.join(sorted(syntaxes))}), without transcoding"
    )


def _multipart(
    parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], boundary: str
) -> Iterator[bytes]:
    delim = f"--{boundary}\r\n".encode()
    for headers, body in parts:
        yield delim + _part_head(headers)
        yield from body
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _part_head(headers: dict[str, str]) -> bytes:
    return ("".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1")


def _read_into(fh: BinaryIO, view: memoryview) -> None:
    """Fill `view` from `fh` (a file, or the Orthanc backend's HTTP stream).

    Raises:
        NotFoundError: the stored bytes are shorter than the index says.
    """
    while view:
        n = fh.readinto(view)  # type: ignore[attr-defined]
        if not n:
            raise NotFoundError("stored instance is shorter than its index row says")
        view = view[n:]


def _map(fh: BinaryIO, size: int) -> memoryview | None:
    """The stored bytes of a plain file, mapped read-only (no copy: the kernel sends them
    from the page cache); None for anything else (the Orthanc backend's HTTP stream).

    Raises:
        NotFoundError: the file is shorter than the index says.
    """
    if not (isinstance(fh, io.BufferedReader) and isinstance(fh.raw, io.FileIO)) or not size:
        return None
    fd = fh.fileno()
    if os.fstat(fd).st_size < size:  # mapping past the end would fault when sent
        raise NotFoundError("stored instance is shorter than its index row says")
    # Content-addressed files are never rewritten in place (a removed file stays mapped).
    return memoryview(mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=mmap.PROT_READ))


_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # pages mapped up front


def _read_batch(
    source: InstanceSource, parts: list[tuple[bytes, InstanceRef]]
) -> list[bytes | memoryview]:
    """Several whole parts (head, stored bytes, CRLF) as body chunks: the files mapped (no
    copy), other sources read into one buffer each; the small framing between two bodies
    joined into one chunk."""
    chunks: list[bytes | memoryview] = []
    frame = b""
    for head, ref in parts:
        frame += head
        with source.open_instance(ref) as fh:
            body = _map(fh, ref.size)
            if body is None:
                body = memoryview(bytearray(ref.size))
                _read_into(fh, body)
        if len(body):
            chunks += [frame, body]
            frame = b""
        frame += b"\r\n"
    if frame:
        chunks.append(frame)
    return chunks


async def _multipart_body(
    source: InstanceSource, batches: list[list[tuple[bytes, InstanceRef]]], closing: bytes
) -> AsyncIterator[bytes | memoryview]:
    """The batches read in a worker thread, the next one while this one is sent; an instance
    larger than a batch (a whole-slide image) goes alone, a batch at a time."""
    loop = asyncio.get_running_loop()

    def start(
        batch: list[tuple[bytes, InstanceRef]],
    ) -> asyncio.Future[list[bytes | memoryview]] | None:
        if len(batch) == 1 and batch[0][1].size > BATCH:
            return None
        return loop.run_in_executor(None, _read_batch, source, batch)

    pending = start(batches[0]) if batches else None
    for i, batch in enumerate(batches):
        current = pending
        pending = start(batches[i + 1]) if i + 1 < len(batches) else None
        if current is not None:
            for chunk in await current:
                yield chunk
            continue
        head, ref = batch[0]
        yield head
        fh = await loop.run_in_executor(None, source.open_instance, ref)
        try:
            left = ref.size
            while left:
                view = memoryview(bytearray(min(left, BATCH)))
                await loop.run_in_executor(None, _read_into, fh, view)
                left -= len(view)
                yield view
        finally:
            fh.close()
        yield b"\r\n"
    yield closing


def retrieve(
    source: InstanceSource, refs: list[InstanceRef], root_url: str, accept: str
) -> Response:
    """The instances as `multipart/related; type="application/dicom"`, streamed from the store
    as stored: about `BATCH` bytes in memory at a time (two batches while one is sent and the
    next read), with a Content-Length (sizes are in the index)."""
    check_accept(accept, "application/dicom", {r.transfer_syntax_uid for r in refs})
    boundary = secrets.token_hex(16)
    delim = f"--{boundary}\r\n".encode()
    batches: list[list[tuple[bytes, InstanceRef]]] = [[]]
    size = length = 0
    for ref in refs:
        head = delim + _part_head(
            {
                "Content-Type": f"application/dicom; transfer-syntax={ref.transfer_syntax_uid}",
                "Content-Location": f"{root_url}/studies/{ref.study_uid}/series/"
                f"{ref.series_uid}/instances/{ref.sop_uid}",
                "Content-Length": str(ref.size),
            }
        )
        if size and size + ref.size > BATCH:
            batches.append([])
            size = 0
        batches[-1].append((head, ref))
        size += len(head) + ref.size + 2
        length += len(head) + ref.size + 2
    closing = f"--{boundary}--\r\n".encode()
    return StreamingResponse(
        _multipart_body(source, batches, closing),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        headers={"Content-Length": str(length + len(closing))},
    )


def metadata(source: InstanceSource, refs: list[InstanceRef]) -> Response:
    """WADO-RS metadata: DICOM JSON of each instance, bulk data elements left out (the text
    kept at ingest, joined as it is)."""
    texts = [
        ref.metadata_json
        if ref.metadata_json is not None
        else json.dumps(source.metadata(ref), ensure_ascii=False, separators=(",", ":"))
        for ref in refs
    ]
    body = ("[" + ",".join(texts) + "]").encode("utf-8")
    return Response(body, media_type=DICOM_JSON)


def frames(
    source: InstanceSource, ref: InstanceRef, frame_list: str, accept: str, url: str
) -> Response:
    """WADO-RS RetrieveFrames for native (uncompressed) pixel data, as octet-stream parts.

    Raises:
        NotAcceptableError: compressed pixel data (we do not transcode), or a media type
            other than application/octet-stream.
        NotFoundError: no pixel data, or a frame number outside 1..NumberOfFrames.
        InputError: a frame list that is not comma-separated positive integers.
    """
    try:
        numbers = [int(n) for n in frame_list.split(",")]
    except ValueError as exc:
        raise InputError("the frame list must be comma-separated frame numbers") from exc
    if not numbers or min(numbers) < 1:
        raise InputError("bad frame list: frames are numbered from 1")
    ts = UID(ref.transfer_syntax_uid)
    if ts.is_compressed:
        raise NotAcceptableError(
            f"frames of {ts.name or ts} pixel data are not served (no transcoding); "
            "retrieve the instance instead"
        )
    check_accept(accept, "application/octet-stream", {str(ts)})
    with source.open_instance(ref) as fh:
        ds = read_dataset(fh, stop_before_pixels=False)
    if "PixelData" not in ds:
        raise NotFoundError(f"instance {ref.sop_uid} has no pixel data")
    bits = int(ds.get("BitsAllocated", 0))
    if bits % 8:
        raise NotAcceptableError(f"frames of {bits}-bit pixel data are not served")
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if max(numbers) > count:
        raise NotFoundError(f"instance {ref.sop_uid} has {count} frame(s)")
    pixels: bytes = ds.PixelData
    boundary = secrets.token_hex(16)
    parts = [
        (
            {
                "Content-Type": f"application/octet-stream; transfer-syntax={ts}",
                "Content-Location": f"{url}/frames/{n}",
            },
            [pixels[(n - 1) * size : n * size]],
        )
        for n in numbers
    ]
    return StreamingResponse(
        _multipart(parts, boundary),
        media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
    )


def _json(content: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, media_type=DICOM_JSON, headers=headers)


def search_response(results: list[Json], total: int, offset: int, host: str) -> Response:
    """QIDO answer; a `Warning: 299` tells of results beyond the page (PS3.18 8.3.4.4)."""
    headers = {}
    remaining = total - offset - len(results)
    if remaining > 0:
        headers["Warning"] = (
            f'299 {host}: "There are {remaining} additional results that can be requested"'
        )
    return _json(results, headers)


def refs_of(
    source: InstanceSource,
    scope: str,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    with_metadata: bool = False,
) -> list[InstanceRef]:
    """The instances named by a WADO-RS path, in the scope (their DICOM JSON `with_metadata`).

    Raises:
        NotFoundError: nothing there in this scope.
    """
    refs = [
        r
        for r in source.iter_instances(scope, study_uid, series_uid, with_metadata=with_metadata)
        if sop_uid is None or r.sop_uid == sop_uid
    ]
    if not refs:
        what = "/".join(u for u in (study_uid, series_uid, sop_uid) if u)
        raise NotFoundError(f"no instances at {what}" + (f" in case {scope}" if scope else ""))
    return refs


def offset_of(params: Sequence[tuple[str, str]]) -> int:
    return next((int(v) for k, v in params if k == "offset" and _COUNT_RE.fullmatch(v)), 0)


# --- the per-case router ------------------------------------------------------------------

router = APIRouter(prefix="/cases/{case_id}/dicom-web", tags=["dicomweb"])
_BUILD_LOCK = threading.Lock()


async def get_image_store(request: Request) -> ImageStore:
    """The app's image store (`images.backend` in settings), built on first use (construction
    only, no I/O: answered in the event loop, no worker-thread hop)."""
    state = request.app.state
    found: ImageStore | None = getattr(state, "image_store", None)
    if found is None:
        with _BUILD_LOCK:
            found = getattr(state, "image_store", None)
            if found is None:
                found = build_image_store(state.settings, state.store, requests.Session())
                state.image_store = found
    return found


@dataclass(frozen=True)
class CaseImages:
    """One per-case DICOMweb request: who asks, for which case, and where its images are."""

    request: Request
    case_id: str
    store: Store
    images: ImageStore
    who: Principal

    @property
    def root(self) -> str:
        """Absolute, from the configured public base URL (never the request's Host header)."""
        settings: Settings = self.request.app.state.settings
        return f"{settings.base_url}/cases/{self.case_id}/dicom-web"

    @property
    def accept(self) -> str:
        return self.request.headers.get("accept", "")

    def authorise(self) -> str:
        """Authorise the caller on the case (404 unknown, 403 not theirs); the case's patient.

        A read-only transaction (no write lock); the audit row is written afterwards in its
        own short write transaction (`audit`).
        """
        with self.store.connection(readonly=True) as conn:
            return access.case_patient(conn, self.case_id, self.who)

    def audit(self, action: str, patient: str, entity: list[str]) -> None:
        """One short write transaction: the audit row (and the chain's checkpoint), on a Core
        connection (no ORM session: about a fifth less CPU per request)."""
        with self.store.connection() as conn:
            audit.append(
                conn,
                self.store.key_dir,
                action,
                self.who.actor,
                case_id=self.case_id,
                patient=patient,
                entity=entity,
            )


async def case_images(
    request: Request,
    case_id: str,
    store: StoreDep,
    images: Annotated[ImageStore, Depends(get_image_store)],
    who: Principal = STAFF_READER,
) -> CaseImages:
    return CaseImages(request, case_id, store, images, who)


Ctx = Annotated[CaseImages, Depends(case_images)]


def _uids(*uids: str | None) -> list[str]:
    return [f"urn:oid:{u}" for u in dict.fromkeys(uids) if u]


def _qido(
    ctx: CaseImages, level: str, study_uid: str | None = None, series_uid: str | None = None
) -> Response:
    params = ctx.request.query_params.multi_items()
    with ctx.store.connection(readonly=True):  # the check and the listing: one read
        patient = ctx.authorise()
        found, total = search(
            ctx.images, ctx.case_id, ctx.root, level, params, study_uid, series_uid
        )
    ctx.audit("images.search", patient, [*_uids(study_uid, series_uid), f"count:{total}"])
    log.info(
        "dicomweb.search.done", case_id=ctx.case_id, level=level, count=len(found), total=total
    )
    host = urlsplit(ctx.request.app.state.settings.base_url).hostname or "gateway"
    return search_response(found, total, offset_of(params), host)


def _wado(
    ctx: CaseImages,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    as_metadata: bool = False,
) -> Response:
    with ctx.store.connection(readonly=True):  # the check and the listing: one read
        patient = ctx.authorise()
        refs = refs_of(
            ctx.images, ctx.case_id, study_uid, series_uid, sop_uid, with_metadata=as_metadata
        )
    if not as_metadata:
        check_accept(ctx.accept, "application/dicom", {r.transfer_syntax_uid for r in refs})
    entity = _uids(study_uid, *(r.series_uid for r in refs), *(r.sop_uid for r in refs))
    ctx.audit("images.retrieve", patient, entity)
    log.info(
        "dicomweb.retrieve.start",
        case_id=ctx.case_id,
        instances=len(refs),
        bytes=sum(r.size for r in refs),
        metadata=as_metadata,
    )
    if as_metadata:
        return metadata(ctx.images, refs)
    return retrieve(ctx.images, refs, ctx.root, ctx.accept)


@router.get("/studies")
def search_studies(ctx: Ctx) -> Response:
    """QIDO-RS SearchForStudies in the case."""
    return _qido(ctx, "studies")


@router.get("/series")
def search_all_series(ctx: Ctx) -> Response:
    return _qido(ctx, "series")


@router.get("/instances")
def search_all_instances(ctx: Ctx) -> Response:
    return _qido(ctx, "instances")


@router.get("/studies/{study_uid}/series")
def search_series(study_uid: str, ctx: Ctx) -> Response:
    return _qido(ctx, "series", study_uid)


@router.get("/studies/{study_uid}/instances")
def search_study_instances(study_uid: str, ctx: Ctx) -> Response:
    return _qido(ctx, "instances", study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances")
def search_instances(study_uid: str, series_uid: str, ctx: Ctx) -> Response:
    return _qido(ctx, "instances", study_uid, series_uid)


@router.get("/studies/{study_uid}")
def retrieve_study(study_uid: str, ctx: Ctx) -> Response:
    """WADO-RS RetrieveStudy: every instance of the study held for the case, as stored."""
    return _wado(ctx, study_uid)


@router.get("/studies/{study_uid}/metadata")
def study_metadata(study_uid: str, ctx: Ctx) -> Response:
    return _wado(ctx, study_uid, as_metadata=True)


@router.get("/studies/{study_uid}/series/{series_uid}")
def retrieve_series(study_uid: str, series_uid: str, ctx: Ctx) -> Response:
    return _wado(ctx, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/metadata")
def series_metadata(study_uid: str, series_uid: str, ctx: Ctx) -> Response:
    return _wado(ctx, study_uid, series_uid, as_metadata=True)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}")
def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str, ctx: Ctx) -> Response:
    return _wado(ctx, study_uid, series_uid, sop_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata")
def instance_metadata(study_uid: str, series_uid: str, sop_uid: str, ctx: Ctx) -> Response:
    return _wado(ctx, study_uid, series_uid, sop_uid, as_metadata=True)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame_list}")
def retrieve_frames(
    study_uid: str, series_uid: str, sop_uid: str, frame_list: str, ctx: Ctx
) -> Response:
    """WADO-RS RetrieveFrames (native pixel data only; 406 for compressed)."""
    patient = ctx.authorise()
    ref = refs_of(ctx.images, ctx.case_id, study_uid, series_uid, sop_uid)[0]
    url = f"{ctx.root}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
    response = frames(ctx.images, ref, frame_list, ctx.accept, url)
    ctx.audit("images.retrieve", patient, _uids(study_uid, series_uid, sop_uid))
    return response


# --- rendered and thumbnail (PS3.18 §8.3.5 and §9.5) ---------------------------------------

ROWS, SERIES_NUMBER, INSTANCE_NUMBER = "00280010", "00200011", "00200013"


def _first_int(md: Json, tag: str) -> int:
    values = (md.get(tag) or {}).get("Value") or [0]
    try:
        return int(values[0])
    except (TypeError, ValueError):
        return 0


def representative(source: InstanceSource, refs: list[InstanceRef]) -> InstanceRef:
    """The instance a study or series thumbnail shows: the middle image (by Instance Number)
    of the first series (by Series Number) that has images (Rows present).

    Raises:
        NotFoundError: none of the instances has pixel data.
    """
    images: dict[str, list[tuple[int, str, InstanceRef]]] = {}
    order: dict[str, tuple[int, str]] = {}
    for ref in refs:
        md = source.metadata(ref)
        if ROWS not in md:  # no Image Pixel module (SR, KOS, ...); metadata omits Pixel Data
            continue
        images.setdefault(ref.series_uid, []).append(
            (_first_int(md, INSTANCE_NUMBER), ref.sop_uid, ref)
        )
        order.setdefault(ref.series_uid, (_first_int(md, SERIES_NUMBER), ref.series_uid))
    if not images:
        raise NotFoundError("nothing here has pixel data to render")
    series = min(order, key=lambda s: order[s])
    members = sorted(images[series], key=lambda m: (m[0], m[1]))
    return members[len(members) // 2][2]


def render_options(request: Request, *, thumbnail: bool) -> render.RenderOptions:
    """The rendered-resource query parameters (§8.3.5.1) and Accept, checked before any read.

    Raises:
        InputError: a bad window, viewport or quality (400).
        NotAcceptableError: neither JPEG nor PNG acceptable (406).
    """
    q = request.query_params
    accept = q.get("accept") or request.headers.get("accept", "")
    return render.RenderOptions(
        media_type=render.choose_media_type(accept),
        window=render.parse_window(q["window"]) if "window" in q and not thumbnail else None,
        viewport=render.parse_viewport(q["viewport"])
        if "viewport" in q
        else (render.THUMBNAIL_SIZE if thumbnail else None),
        quality=render.parse_quality(q["quality"]) if "quality" in q else 90,
    )


def rendered_image(
    source: InstanceSource, ref: InstanceRef, frame: int, options: render.RenderOptions
) -> Response:
    """One frame of `ref` rendered as asked (decode, window, fit, encode)."""
    with source.open_instance(ref) as fh:
        readable: BinaryIO = fh if fh.seekable() else io.BytesIO(fh.read())
        ds, pixels = render.decode_frame(readable, ref.transfer_syntax_uid, frame)
    body = render.render(ds, pixels, options)
    return Response(body, media_type=options.media_type)


def _one_frame(frame_list: str) -> int:
    if not frame_list.isdigit() or int(frame_list) < 1:
        raise InputError(
            "rendered and thumbnail frames take one frame number (an integer from 1)",
            expression=["frames"],
        )
    return int(frame_list)


def _render(
    ctx: CaseImages,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    frame: int = 1,
    *,
    thumbnail: bool,
) -> Response:
    options = render_options(ctx.request, thumbnail=thumbnail)
    patient = ctx.authorise()
    refs = refs_of(ctx.images, ctx.case_id, study_uid, series_uid, sop_uid)
    ref = refs[0] if sop_uid else representative(ctx.images, refs)
    response = rendered_image(ctx.images, ref, frame, options)
    ctx.audit("images.retrieve", patient, _uids(study_uid, ref.series_uid, ref.sop_uid))
    log.info(
        "dicomweb.render.done",
        case_id=ctx.case_id,
        thumbnail=thumbnail,
        media_type=options.media_type,
        bytes=len(response.body),
    )
    return response


@router.get("/studies/{study_uid}/thumbnail")
def study_thumbnail(study_uid: str, ctx: Ctx) -> Response:
    """Thumbnail of the study: its first series' middle image (PS3.18 §9.5)."""
    return _render(ctx, study_uid, thumbnail=True)


@router.get("/studies/{study_uid}/series/{series_uid}/thumbnail")
def series_thumbnail(study_uid: str, series_uid: str, ctx: Ctx) -> Response:
    """Thumbnail of the series: its middle image."""
    return _render(ctx, study_uid, series_uid, thumbnail=True)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/thumbnail")
def instance_thumbnail(study_uid: str, series_uid: str, sop_uid: str, ctx: Ctx) -> Response:
    return _render(ctx, study_uid, series_uid, sop_uid, thumbnail=True)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame_list}/thumbnail"
)
def frame_thumbnail(
    study_uid: str, series_uid: str, sop_uid: str, frame_list: str, ctx: Ctx
) -> Response:
    return _render(ctx, study_uid, series_uid, sop_uid, _one_frame(frame_list), thumbnail=True)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/rendered")
def instance_rendered(study_uid: str, series_uid: str, sop_uid: str, ctx: Ctx) -> Response:
    """RetrieveRenderedInstance: the first frame as JPEG (default) or PNG, windowed by
    `window=` or the dataset's VOI window, fitted into `viewport=` if given."""
    return _render(ctx, study_uid, series_uid, sop_uid, thumbnail=False)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame_list}/rendered"
)
def frame_rendered(
    study_uid: str, series_uid: str, sop_uid: str, frame_list: str, ctx: Ctx
) -> Response:
    """RetrieveRenderedFrames for one frame."""
    return _render(ctx, study_uid, series_uid, sop_uid, _one_frame(frame_list), thumbnail=False)
