"""DICOMweb client (DICOM PS3.18): QIDO-RS search, WADO-RS retrieval streamed to disk, STOW-RS.

Built on an injected `requests.Session`. Retrieval never holds more than one network chunk of a
study in memory: each part of the `multipart/related` response is written to a temporary file as
it arrives (our own reader in `connectors.multipart`), hashed on the way, then checked to parse as
DICOM before it is handed on. A bad part is rejected for that instance only.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import pydicom
import requests
import structlog
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from connectors._http import send
from connectors.multipart import (
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    PartTruncated,
    boundary_of,
)
from connectors.part10 import Part10Info, scan_part10
from fhir_gateway.errors import (
    ParseError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)

log = structlog.get_logger(__name__)

TokenProvider = Callable[[], str]
Json = dict[str, Any]

# WADO-RS "as stored": any transfer syntax, so instances arrive byte-identical (PS3.18 8.7.3.5.2).
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_JSON = "application/dicom+json"
CHUNK = 256 << 10  # bytes per read: hashed and written while still in the CPU cache
HEAD_KEEP = 64 << 10  # first bytes of each part kept in memory for the Part 10 check
# Characters that stay unencoded in QIDO query values. Orthanc's DICOMweb plugin matches the raw
# query text without percent-decoding it: `PatientName=Doe%2A` finds nothing where `Doe*` finds
# the study (checked against Orthanc 1.10 + DICOMweb plugin in
# tests/integration/imaging/test_dicomweb_orthanc.py::test_orthanc_does_not_decode_wildcards).
# dicomweb-client sends `%2A` (urlencode), so its wildcard searches silently return nothing there.
# `^` (PN component separator) cannot be sent raw: it is not a legal URI character, and
# requests/urllib3 percent-encode it whatever we pass, so Orthanc cannot match values holding `^`;
# our searches use PatientID, AccessionNumber, UIDs, dates and modalities, which never need it.
_QIDO_SAFE = "*?-,._~:/"

# DICOM tags used in QIDO results (PS3.18 Table 10.6.1-5).
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


class BearerTokenAuth(requests.auth.AuthBase):
    """`Authorization: Bearer <token>`, the token asked of `provider` on every request.

    The provider caches and refreshes (e.g. SMART Backend Services in `connectors.smart`).
    """

    def __init__(self, provider: TokenProvider) -> None:
        self._provider = provider

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._provider()}"
        return r


def make_auth(
    kind: str,
    *,
    username: str = "",
    password: str = "",
    token: str = "",
    token_provider: TokenProvider | None = None,
) -> requests.auth.AuthBase | None:
    """Auth for one source: `none`, `basic`, `bearer` (static token) or `smart` (provider)."""
    if kind == "none":
        return None
    if kind == "basic":
        return requests.auth.HTTPBasicAuth(username, password)
    if kind == "bearer":
        return BearerTokenAuth(lambda: token)
    if kind == "smart" and token_provider is not None:
        return BearerTokenAuth(token_provider)
    raise ValueError(f"unsupported DICOMweb auth {kind!r} (smart needs a token_provider)")


@dataclass(frozen=True)
class RetrievedInstance:
    """One instance written to `path` (a temp file the caller moves or deletes)."""

    path: Path
    sha256: str
    size: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    # The bytes before Pixel Data when they arrived within the first HEAD_KEEP bytes: the store
    # describes the instance (DICOM JSON) from them without reading the file again.
    header: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RejectedPart:
    """A part that did not verify as DICOM; the rest of the response is still used."""

    study_uid: str
    series_uid: str
    reason: str
    sop_uid: str = ""  # when known (per-instance retrieval or a Content-Location header)


Retrieved = RetrievedInstance | RejectedPart


@dataclass(frozen=True)
class SeriesPlan:
    """What to fetch of one series: all of it, or only the listed missing instances."""

    study_uid: str
    series_uid: str
    missing_sop_uids: tuple[str, ...] | None = None  # None: fetch the whole series


class DicomwebClient:
    """QIDO-RS / WADO-RS / STOW-RS against one DICOMweb base URL (e.g. `.../dicom-web`)."""

    def __init__(
        self,
        session: requests.Session,
        base_url: str,
        *,
        timeout_s: float = 60.0,
        auth: requests.auth.AuthBase | None = None,
        page_size: int = 100,
        max_parallel: int = 4,
        system: str = "dicomweb",
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout_s
        self._auth = auth
        self._page_size = page_size
        self._max_parallel = max(1, max_parallel)
        self._system = system

    # -- HTTP with error translation ---------------------------------------------------------

    def _request(
        self, method: str, url: str, *, stream: bool = False, **kwargs: Any
    ) -> requests.Response:
        return send(
            self._session,
            method,
            url,
            system=self._system,
            timeout=self._timeout,
            auth=self._auth,
            stream=stream,
            **kwargs,
        )

    # -- QIDO-RS -------------------------------------------------------------------------------

    def _search(self, path: str, params: Mapping[str, str | Iterable[str]]) -> list[Json]:
        """All matches, paged with limit/offset; follows `Warning: 299 ... additional results`.

        Orthanc's plugin truncates at `limit` without the Warning header, so a full page also
        asks for the next one. 204 No Content means no matches (PS3.18 10.6.3.3).
        """
        out: list[Json] = []
        offset = 0
        while True:
            query = _query({**params, "limit": str(self._page_size), "offset": str(offset)})
            r = self._request("GET", f"{self.base_url}/{path}?{query}", headers=_JSON_HEADERS)
            if r.status_code == 204 or not r.content:
                return out
            try:
                page = r.json()
            except ValueError as exc:
                raise UpstreamRejectedError(
                    f"{self._system} QIDO answer is not JSON", system=self._system, url=r.url
                ) from exc
            if not isinstance(page, list):
                raise UpstreamRejectedError(
                    f"{self._system} QIDO answer is not a JSON array", system=self._system
                )
            out += page
            more = "additional results" in (r.headers.get("Warning") or "")
            if not page or (not more and len(page) < self._page_size):
                return out
            offset += len(page)

    def search_studies(
        self,
        *,
        patient_id: str | None = None,
        issuer_of_patient_id: str | None = None,
        accession_number: str | None = None,
        study_uid: str | None = None,
        study_date: tuple[str, str] | None = None,  # (from, to) YYYYMMDD, either may be ""
        modalities: Iterable[str] = (),
        extra: Mapping[str, str] | None = None,
    ) -> list[Json]:
        """QIDO-RS SearchForStudies (PS3.18 10.6): DICOM JSON of each matching study."""
        params: dict[str, str | Iterable[str]] = {}
        if patient_id:
            params["PatientID"] = patient_id
        if issuer_of_patient_id:
            params["IssuerOfPatientID"] = issuer_of_patient_id
        if accession_number:
            params["AccessionNumber"] = accession_number
        if study_uid:
            params["StudyInstanceUID"] = study_uid
        if study_date:
            params["StudyDate"] = f"{study_date[0]}-{study_date[1]}"
        mods = list(modalities)
        if mods:
            params["ModalitiesInStudy"] = ",".join(mods)
        # Not 00080005: Orthanc 1.10's plugin answers 400 to `includefield=00080005` for studies
        # in ISO 2022 character sets (seen with the corpus chrH31/chrI2 files); it sends it anyway.
        params["includefield"] = ["00081030", "00201206", "00201208", "00100010"]
        params.update(extra or {})
        return self._search("studies", params)

    def search_series(self, study_uid: str) -> list[Json]:
        """QIDO-RS SearchForSeries in one study."""
        return self._search(
            f"studies/{study_uid}/series",
            {"includefield": ["0008103E", "00200011", "00180015", "00200060", "00080021"]},
        )

    def search_instances(self, study_uid: str, series_uid: str) -> list[Json]:
        """QIDO-RS SearchForInstances in one series."""
        return self._search(f"studies/{study_uid}/series/{series_uid}/instances", {})

    # -- WADO-RS -------------------------------------------------------------------------------

    def retrieve_series(self, study_uid: str, series_uid: str, dest: Path) -> Iterator[Retrieved]:
        """Stream one series (WADO-RS RetrieveSeries) into temp files under `dest`."""
        url = f"{self.base_url}/studies/{study_uid}/series/{series_uid}"
        yield from self._retrieve(url, dest, study_uid, series_uid, "")

    def retrieve_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, dest: Path
    ) -> Iterator[Retrieved]:
        """One instance (WADO-RS RetrieveInstance), for partially held series."""
        url = f"{self.base_url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
        yield from self._retrieve(url, dest, study_uid, series_uid, sop_uid)

    def retrieve_study_url(self, study_uid: str) -> str:
        return f"{self.base_url}/studies/{study_uid}"

    def retrieve_study(self, study_uid: str, dest: Path) -> Iterator[Retrieved]:
        """Stream a whole study in one response (used when no per-series plan is wanted)."""
        yield from self._retrieve(self.retrieve_study_url(study_uid), dest, study_uid, "", "")

    def plan_study(self, study_uid: str, held: set[str]) -> list[SeriesPlan]:
        """Per series: skip when all held, whole series when none held, else missing instances."""
        plans: list[SeriesPlan] = []
        for series in self.search_series(study_uid):
            series_uid = first_value(series, SERIES_UID)
            if not series_uid:
                continue
            if not held:
                plans.append(SeriesPlan(study_uid, series_uid))
                continue
            sops = [first_value(i, SOP_UID) for i in self.search_instances(study_uid, series_uid)]
            missing = tuple(s for s in sops if s and s not in held)
            if not missing:
                continue
            whole = len(missing) == len(sops)
            plans.append(SeriesPlan(study_uid, series_uid, None if whole else missing))
        return plans

    def pull_plans(
        self, plans: Iterable[SeriesPlan], dest: Path, sink: Callable[[Retrieved], None]
    ) -> None:
        """Fetch the planned series in parallel (bounded); `sink` gets each result from the
        thread that fetched it, so it must be thread-safe.

        Errors of one series (network, 5xx) propagate after the other series finished, so what
        was fetched is kept and a retry resumes from it.
        """

        def run(plan: SeriesPlan) -> None:
            if plan.missing_sop_uids is None:
                results: Iterable[Retrieved] = self.retrieve_series(
                    plan.study_uid, plan.series_uid, dest
                )
            else:
                results = (
                    r
                    for sop in plan.missing_sop_uids
                    for r in self.retrieve_instance(plan.study_uid, plan.series_uid, sop, dest)
                )
            for result in results:
                sink(result)

        with ThreadPoolExecutor(self._max_parallel, thread_name_prefix="wado") as pool:
            futures = [pool.submit(run, p) for p in plans]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]

    def _retrieve(
        self, url: str, dest: Path, study_uid: str, series_uid: str, sop_uid: str
    ) -> Iterator[Retrieved]:
        # identity: DICOM is often already compressed, and gzip costs both ends CPU.
        headers = {"Accept": ACCEPT_DICOM, "Accept-Encoding": "identity"}
        r = self._request("GET", url, stream=True, headers=headers)
        with r:
            if r.status_code == 204:
                return
            ctype = r.headers.get("Content-Type", "")
            if not ctype.lower().startswith("multipart/related"):
                raise UpstreamRejectedError(
                    f"{self._system} WADO-RS answered {ctype or 'no Content-Type'}",
                    system=self._system,
                    url=url,
                )
            try:
                yield from read_parts(
                    _iter_raw(r, self._system, url),
                    boundary_of(ctype),
                    dest,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=sop_uid,
                )
            except ParseError as exc:
                raise UpstreamRejectedError(
                    f"{self._system} WADO-RS multipart unreadable: {exc.message}",
                    system=self._system,
                    url=url,
                ) from exc

    # -- STOW-RS -------------------------------------------------------------------------------

    def store(self, data: bytes | BinaryIO, study_uid: str | None = None) -> Json:
        """STOW-RS one instance (PS3.18 10.5); returns the response dataset (DICOM JSON)."""
        boundary = "fhir-gateway-stow-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
        payload = data if isinstance(data, bytes) else data.read()
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                payload,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        url = f"{self.base_url}/studies" + (f"/{study_uid}" if study_uid else "")
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": ACCEPT_JSON,
        }
        r = self._request("POST", url, data=body, headers=headers)
        answer: Json = r.json() if r.content else {}
        if (answer.get("00081198") or {}).get("Value"):  # FailedSOPSequence with items
            raise UpstreamRejectedError(
                f"{self._system} STOW-RS refused the instance", system=self._system, url=url
            )
        return answer


_JSON_HEADERS = {"Accept": ACCEPT_JSON}


def _query(params: Mapping[str, str | Iterable[str]]) -> str:
    """A QIDO query string; wildcard and range characters stay unencoded (see _QIDO_SAFE)."""
    parts: list[str] = []
    for key, value in params.items():
        values = [value] if isinstance(value, str) else list(value)
        parts += [f"{quote(key, safe='')}={quote(v, safe=_QIDO_SAFE)}" for v in values]
    return "&".join(parts)


def _iter_raw(r: requests.Response, system: str, url: str) -> Iterator[bytes]:
    try:
        yield from r.iter_content(CHUNK)
    except requests.RequestException as exc:
        raise UpstreamUnavailableError(
            f"{system} connection broke during WADO-RS: {type(exc).__name__}",
            system=system,
            url=url,
        ) from exc


def first_value(dataset: Json, tag: str) -> str:
    """First value of `tag` in a DICOM JSON dataset, as text ('' when absent)."""
    values = (dataset.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else ""


def read_parts(
    chunks: Iterable[bytes],
    boundary: bytes,
    dest: Path,
    *,
    study_uid: str = "",
    series_uid: str = "",
    sop_uid: str = "",
) -> Iterator[Retrieved]:
    """Write each part of a multipart body to a temp file in `dest`, verify it, yield results.

    Memory holds one chunk at a time. A part that does not verify as DICOM (or that the stream
    cut short) yields `RejectedPart` and its temp file is removed; the next part still counts.

    Raises:
        ParseError: the body is not multipart at all (no delimiter).
    """
    dest.mkdir(parents=True, exist_ok=True)
    reader = MultipartReader(boundary)
    part: _PartFile | None = None
    prefix = uuid.uuid4().hex
    names = (f"{prefix}-{n}.part" for n in itertools.count())

    def handle(events: list[Any]) -> Iterator[Retrieved]:
        nonlocal part
        for event in events:
            if isinstance(event, PartStart):
                part = _PartFile(dest, next(names), event.headers)
            elif isinstance(event, PartData) and part is not None:
                part.write(event.data)
            elif isinstance(event, PartEnd) and part is not None:
                yield part.finish(study_uid, series_uid, sop_uid)
                part = None
            elif isinstance(event, PartTruncated) and part is not None:
                yield part.reject(study_uid, series_uid, sop_uid, event.reason)
                part = None

    try:
        for chunk in chunks:
            yield from handle(reader.feed(chunk))
        yield from handle(reader.close())
    finally:
        if part is not None:  # an exception mid-part: leave no temp file behind
            part.discard()


class _PartFile:
    """One part on its way to disk: written, hashed and its first bytes kept as it arrives,
    so checking it needs no second read of the file."""

    def __init__(self, dest: Path, name: str, headers: dict[str, str]) -> None:
        self.path = dest / name
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self.size = 0
        self.headers = headers

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(self._fd, view) :]
        self._hash.update(data)
        if len(self._head) < HEAD_KEEP:
            self._head += data[: HEAD_KEEP - len(self._head)]
        self.size += len(data)

    def discard(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def reject(self, study: str, series: str, sop: str, reason: str) -> RejectedPart:
        self.discard()
        log.warning("dicomweb.part.rejected", reason=reason, size=self.size)
        return RejectedPart(study, series, reason, sop or _sop_from_location(self.headers))

    def finish(self, study: str, series: str, sop: str) -> Retrieved:
        fd = self._fd
        # Fast structural check from the bytes kept in memory; pydicom decides when it is unsure.
        head = bytes(self._head)
        info = scan_part10(head, self.size, lambda at, n: os.pread(fd, n, at))
        self._close()
        if info is None:
            try:
                info = verify_part10(self.path)
            except ParseError as exc:
                return self.reject(study, series, sop, exc.message)
        return RetrievedInstance(
            path=self.path,
            sha256=self._hash.hexdigest(),
            size=self.size,
            study_uid=info.study_uid,
            series_uid=info.series_uid,
            sop_uid=info.sop_uid,
            sop_class_uid=info.sop_class_uid,
            transfer_syntax_uid=info.transfer_syntax_uid,
            header=head[: info.header_end]
            if info.header_end is not None and info.header_end <= len(head)
            else None,
        )


def _sop_from_location(headers: Mapping[str, str]) -> str:
    loc = headers.get("content-location", "")
    return loc.rsplit("/instances/", 1)[1].split("/")[0] if "/instances/" in loc else ""


_VERIFY_LOCK = threading.Lock()


def verify_part10(path: Path) -> Part10Info:
    """Check that `path` is a complete DICOM Part 10 file; return its identifying UIDs.

    pydicom alone is not enough: it silently stops at a truncated element instead of raising,
    so we also check that the last top-level element ends exactly at the end of the file, and
    that native (uncompressed) Pixel Data is as long as Rows x Columns x ... says. DICOM values
    have even lengths, so every cut at an odd offset is caught; a cut exactly between two
    elements cannot be told from a shorter file (real files lack even Pixel Data: the corpus
    chrJapMulti.dcm has Rows and no pixels), so such a part is kept.

    Raises:
        ParseError: header-less, unparsable, truncated, or missing an identifying UID.
    """
    size = path.stat().st_size
    # pydicom warns about invalid values (a cut UID...); the checks below decide instead. The
    # lock makes catch_warnings (process-global) safe across the retrieval threads.
    try:
        with _VERIFY_LOCK, warnings.catch_warnings(), path.open("rb") as fh:
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fh, defer_size=256)
            end = _dataset_end(ds)
            study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
            sop, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
            ts = ds.file_meta.get("TransferSyntaxUID")
            pixel_len = _native_pixel_shortfall(ds, ts)
    except InvalidDicomError as exc:
        raise ParseError(f"not DICOM Part 10 (no preamble/DICM header): {exc}") from exc
    except (
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        struct.error,
    ) as exc:
        raise ParseError(f"DICOM unparsable: {type(exc).__name__}: {exc}") from exc
    if end is not None and end != size:
        raise ParseError(f"DICOM truncated: elements end at byte {end}, file has {size}")
    if pixel_len:
        raise ParseError(f"DICOM Pixel Data truncated: {pixel_len} bytes short")
    if not (study and series and sop and sop_class):
        raise ParseError("DICOM lacks Study/Series/SOP Instance UID or SOP Class UID")
    return Part10Info(str(study), str(series), str(sop), str(sop_class), str(ts or ""))


def _dataset_end(ds: pydicom.Dataset) -> int | None:
    """File offset where the last top-level element's value ends (None if not knowable)."""
    if not ds._dict:
        return None
    elem = ds._dict[max(ds._dict)]
    if not isinstance(elem, RawDataElement) or elem.value_tell is None:
        return None  # already converted (e.g. deflated): no offsets to check
    if elem.length == 0xFFFFFFFF:
        return None  # undefined length: pydicom has read up to its delimiter
    return int(elem.value_tell) + int(elem.length)


def _native_pixel_shortfall(ds: pydicom.Dataset, ts: Any) -> int:
    elem = ds._dict.get(pydicom.tag.Tag(0x7FE00010))
    if elem is None or ts is None or UID(str(ts)).is_compressed:
        return 0
    if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
        return 0
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    bits = int(ds.get("BitsAllocated", 0))
    samples, frames = int(ds.get("SamplesPerPixel", 1)), int(ds.get("NumberOfFrames", 1) or 1)
    expected = (rows * cols * samples * frames * bits + 7) // 8
    return max(0, expected - int(elem.length))
