"""Image store: DICOM instances held per case, as content-addressed files or in an Orthanc.

Both backends keep one `ImageInstance` index row per (case, SOP Instance UID), so the per-case
DICOMweb (`/cases/{id}/dicom-web`) lists and serves a case's images the same way whichever
backend holds the bytes: `iter_instances()` for QIDO-like listings, `open_instance()` for
WADO-RS bodies, `metadata()` for WADO-RS metadata.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import pydicom
import structlog
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from sqlalchemy import BindParameter, Select, bindparam, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from connectors.dicomweb import RetrievedInstance
from fhir_gateway import jobs
from fhir_gateway.casebundle import held
from fhir_gateway.errors import NotFoundError
from fhir_gateway.store.db import Store
from fhir_gateway.store.models import HeldItem, ImageInstance

if TYPE_CHECKING:
    from connectors.orthanc import OrthancStorage

log = structlog.get_logger(__name__)
AnySelect = Select[*tuple[Any, ...]]


@dataclass(frozen=True)
class InstanceRef:
    """One stored instance of a case (what the index row says)."""

    case_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str
    size: int
    orthanc_id: str | None = None
    # DICOM JSON text taken at ingest (`instance_json`), when the index has it.
    metadata_json: str | None = field(default=None, compare=False, repr=False)


class ImageStore(Protocol):
    """Where a case's DICOM instances are kept."""

    backend: str

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory on the same filesystem as the store for one pull's WADO-RS temp
        files; removed afterwards (what was kept has been moved out of it by then)."""
        ...

    def held_sop_uids(self, case_id: str, study_uid: str | None = None) -> set[str]: ...

    def add(self, case_id: str, item: RetrievedInstance, source: str) -> InstanceRef:
        """Take over the verified temp file `item.path` (moved or uploaded, then removed)."""
        ...

    def add_batch(
        self, case_id: str, items: Sequence[RetrievedInstance], source: str
    ) -> list[InstanceRef]:
        """`add` for several instances, indexed in one transaction."""
        ...

    def iter_instances(
        self,
        case_id: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
        *,
        include_held: bool = False,
        with_metadata: bool = False,
    ) -> Iterator[InstanceRef]:
        """The case's instances; studies held or rejected by the identity check only with
        `include_held` (the pull and the identity check see them; DICOMweb does not); their
        DICOM JSON text loaded along `with_metadata` (else `metadata()` fetches it)."""
        ...

    def iter_series(
        self,
        case_id: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
        *,
        include_held: bool = False,
    ) -> Iterator[tuple[InstanceRef, int]]:
        """Per series of the case (held studies left out): its first instance (by SOP Instance
        UID, with its DICOM JSON) and its instance count; counted by the database."""
        ...

    def open_instance(self, ref: InstanceRef) -> BinaryIO: ...

    def metadata(self, ref: InstanceRef) -> dict[str, Any]: ...

    def delete_case(self, case_id: str) -> int: ...


def staging_dir(data_dir: Path) -> Path:
    """Where retrievals stream to before an instance is stored (both backends)."""
    return data_dir / "tmp" / "wado"


def blob_dir(data_dir: Path) -> Path:
    """The file backend's content-addressed root."""
    return data_dir / "blobs" / "sha256"


def writable_dirs(data_dir: Path, backend: str) -> list[Path]:
    """The directories the image store writes to (readiness checks them)."""
    return [staging_dir(data_dir), *([blob_dir(data_dir)] if backend == "file" else [])]


class _IndexedStore:
    """Index rows shared by both backends."""

    backend = "?"

    def __init__(self, store: Store, data_dir: Path) -> None:
        self._store = store
        self._staging = staging_dir(data_dir)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        self._staging.mkdir(parents=True, exist_ok=True)
        _remove_stale(self._staging)
        path = Path(tempfile.mkdtemp(prefix="pull-", dir=self._staging))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def held_sop_uids(self, case_id: str, study_uid: str | None = None) -> set[str]:
        q = select(ImageInstance.sop_uid).where(ImageInstance.case_id == case_id)
        if study_uid:
            q = q.where(ImageInstance.study_uid == study_uid)
        with self._store.session() as s:
            return set(s.scalars(q))

    def iter_instances(
        self,
        case_id: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
        *,
        include_held: bool = False,
        with_metadata: bool = False,
    ) -> Iterator[InstanceRef]:
        # Columns, not ORM objects: building 500 mapped instances cost more than the query.
        # The statement is built once per shape (`_listing`): building it cost more than
        # running it.
        stmt = _listing(with_metadata, bool(study_uid), bool(series_uid), include_held)
        params = {"case_id": case_id, "study_uid": study_uid, "series_uid": series_uid}
        with self._store.connection(readonly=True) as conn:  # no ORM session: a hot path
            rows = conn.execute(stmt, params).all()
        for row in rows:
            yield _ref_of_columns(row)

    def iter_series(
        self,
        case_id: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
        *,
        include_held: bool = False,
    ) -> Iterator[tuple[InstanceRef, int]]:
        stmt = _series_listing(bool(study_uid), bool(series_uid), include_held)
        params = {"case_id": case_id, "study_uid": study_uid, "series_uid": series_uid}
        with self._store.connection(readonly=True) as conn:  # no ORM session: a hot path
            rows = conn.execute(stmt, params).all()
        for row in rows:
            yield _ref_of_columns(row[:-1]), int(row[-1])

    def get(self, case_id: str, sop_uid: str) -> InstanceRef:
        with self._store.session(readonly=True) as s:
            row = s.get(ImageInstance, (case_id, sop_uid))
            if row is None:
                raise NotFoundError(f"instance {sop_uid} is not part of case {case_id}")
            return _ref(row)

    def metadata(self, ref: InstanceRef) -> dict[str, Any]:
        """The instance's attributes as DICOM JSON (PS3.18 F), bulk data left out: as taken at
        ingest; from the file for rows indexed before that was kept."""
        text = ref.metadata_json
        if text is None:
            with self._store.session(readonly=True) as s:
                text = s.scalar(
                    select(ImageInstance.dicom_json).where(
                        ImageInstance.case_id == ref.case_id, ImageInstance.sop_uid == ref.sop_uid
                    )
                )
        if text is not None:
            out: dict[str, Any] = json.loads(text)
            return out
        with self.open_instance(ref) as fh:
            return instance_json(fh)

    def open_instance(self, ref: InstanceRef) -> BinaryIO:
        raise NotImplementedError

    def delete_case(self, case_id: str) -> int:
        raise NotImplementedError

    def _drop_rows(
        self, case_id: str, key: InstrumentedAttribute[str] | InstrumentedAttribute[str | None]
    ) -> tuple[int, set[str]]:
        """Delete the case's rows; return their count and the `key` values no row uses now."""
        with self._store.session() as s:
            rows = list(s.scalars(select(ImageInstance).where(ImageInstance.case_id == case_id)))
            keys = {getattr(r, key.key) for r in rows} - {None}
            for r in rows:
                s.delete(r)
            s.flush()
            still_used = set(s.scalars(select(key).where(key.in_(keys))))
        return len(rows), keys - still_used

    def add(self, case_id: str, item: RetrievedInstance, source: str) -> InstanceRef:
        return self.add_batch(case_id, [item], source)[0]

    def add_batch(
        self, case_id: str, items: Sequence[RetrievedInstance], source: str
    ) -> list[InstanceRef]:
        memo: Fragments = {}  # the batch's repeats; let go of with the batch
        described = [(item, _describe(item, memo)) for item in items]  # before the file moves
        placed = [(item, self._place(item), text) for item, text in described]
        return self._index(case_id, placed, source)

    def _place(self, item: RetrievedInstance) -> str | None:
        """Put the bytes in the backend; returns the backend's id (if it has one)."""
        raise NotImplementedError

    def _index(
        self,
        case_id: str,
        placed: Sequence[tuple[RetrievedInstance, str | None, str]],
        source: str,
    ) -> list[InstanceRef]:
        refs = []
        uids = [item.sop_uid for item, _, _ in placed]
        with self._store.session() as s:
            # Under the case's lock: a cancelled or rejected case gets no more instances.
            jobs.require_case_open(s, case_id, "storing images")
            existing = {
                row.sop_uid: row
                for row in s.scalars(
                    select(ImageInstance).where(
                        ImageInstance.case_id == case_id, ImageInstance.sop_uid.in_(uids)
                    )
                )
            }
            for item, orthanc_id, text in placed:
                row = existing.get(item.sop_uid)
                if row is None:
                    row = existing[item.sop_uid] = ImageInstance(
                        case_id=case_id, sop_uid=item.sop_uid
                    )
                    s.add(row)
                row.study_uid, row.series_uid = item.study_uid, item.series_uid
                row.sop_class_uid = item.sop_class_uid
                row.transfer_syntax_uid = item.transfer_syntax_uid
                row.sha256, row.size, row.source = item.sha256, item.size, source
                row.backend, row.orthanc_id = self.backend, orthanc_id
                row.dicom_json = text
                refs.append(row)
            s.flush()
            return [_ref(r) for r in refs]


STALE_STAGING_S = 24 * 3600


def _remove_stale(root: Path) -> None:
    """Staging directories left by a pull that was killed (a retry fetches those parts again)."""
    cutoff = time.time() - STALE_STAGING_S
    for path in root.glob("pull-*"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                log.info("images.staging.removed_stale", path=path.name)


def _no_bulk(_elem: Any) -> str:
    return ""


def read_dataset(fh: BinaryIO, *, stop_before_pixels: bool = True) -> pydicom.Dataset:
    """The instance as a pydicom Dataset (by default without Pixel Data). pydicom seeks, so a
    network stream (the Orthanc backend) is first spooled: in memory up to 8 MiB, then to a
    temp file."""
    if fh.seekable():
        return pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels)
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
        shutil.copyfileobj(fh, spool)
        spool.seek(0)
        return pydicom.dcmread(spool, stop_before_pixels=stop_before_pixels)


def instance_json(fh: BinaryIO) -> dict[str, Any]:
    """A Part 10 file's attributes as DICOM JSON (PS3.18 F), bulk data (pixels...) left out."""
    return dataset_json(read_dataset(fh))


def dataset_json(ds: pydicom.Dataset) -> dict[str, Any]:
    """A dataset's attributes as DICOM JSON (PS3.18 F), bulk data elements left out."""
    out: dict[str, Any] = ds.to_json_dict(
        bulk_data_threshold=1024, bulk_data_element_handler=_no_bulk
    )
    return {tag: e for tag, e in out.items() if e.get("BulkDataURI") != ""}


def dataset_json_text(ds: pydicom.Dataset, memo: Fragments | None = None) -> str:
    """`dataset_json(ds)` as compact JSON text (non-ASCII kept), each element's text memoised
    in `memo` (the caller's: e.g. one batch of a study's instances) when given.

    The instances of a study repeat most of their header (patient, study, series, equipment,
    geometry): an element read raw from the file, with an explicit VR that needs no context,
    gives the same JSON wherever it appears under the same transfer syntax and character set,
    so its text is made by pydicom once and looked up after (`memo`, keyed by tag, VR, value
    bytes and that context; emptied past `FRAGMENTS_MAX`). A memo held by the caller, not the
    module: what differs per instance (UIDs, positions) would otherwise stay in memory for the
    process's life. Anything else (converted already, implicit or ambiguous VR,
    UN, a value over `_FRAGMENT_MAX_BYTES`) goes through pydicom every time. The text equals
    `json.dumps(dataset_json(ds), ensure_ascii=False, separators=(",", ":"))` (tested over
    every DICOM file in fixtures/)."""
    raw = ds._dict  # the elements as read: RawDataElement until converted
    context = _fragment_context(ds) if memo is not None else None
    parts: list[str] = []
    for tag in list(raw):  # Dataset.keys(), as to_json_dict walks it
        elem = raw[tag]
        key = None
        if (
            memo is not None
            and context is not None
            and isinstance(elem, RawDataElement)
            and elem.value is not None
            and elem.VR is not None
            and elem.VR not in _CONTEXT_VRS
            and len(elem.value) <= _FRAGMENT_MAX_BYTES
        ):
            key = (tag, elem.VR, elem.value, context)
            text = memo.get(key)
            if text is not None:
                if text:
                    parts.append(text)
                continue
        value = ds[tag].to_json_dict(_no_bulk, 1024)
        text = ""  # a bulk data element: left out
        if value.get("BulkDataURI") != "":
            text = f'"{tag:08X}":' + json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            parts.append(text)
        if key is not None and memo is not None:
            if len(memo) >= FRAGMENTS_MAX:
                memo.clear()
            memo[key] = text
    return "{" + ",".join(parts) + "}"


def _fragment_context(ds: pydicom.Dataset) -> tuple[Any, ...] | None:
    """What an element's JSON depends on besides its own bytes: the transfer syntax, the
    character set, and (for the items of a sequence) the Pixel Representation and Bits
    Allocated that pydicom hands down to them. None: no memo for this dataset."""
    if ds.is_implicit_VR is not False or ds.is_little_endian is not True:
        return None
    charset = ds.original_character_set or ds._character_set
    out: list[Any] = [charset if isinstance(charset, str) else tuple(charset)]
    for tag in (0x00280103, 0x00280100):  # Pixel Representation, Bits Allocated
        elem = ds._dict.get(BaseTag(tag))
        if elem is not None and not isinstance(elem, RawDataElement):
            return None
        out.append(None if elem is None else elem.value)
    return tuple(out)


# (tag, VR, value bytes, context) -> the element's `"TTTTTTTT":{...}` text, "" if left out
Fragments = dict[tuple[Any, ...], str]
FRAGMENTS_MAX = 20_000  # then emptied: one study's repeats are what pays
_FRAGMENT_MAX_BYTES = 4096
# VRs whose JSON depends on more than the element's bytes (pydicom resolves them from context)
_CONTEXT_VRS = frozenset({"UN", "US or SS", "OB or OW", "US or OW", "US or SS or OW"})


def _describe(item: RetrievedInstance, memo: Fragments) -> str:
    """The instance's DICOM JSON text: from the header bytes kept while it streamed in, or
    (a part that only pydicom could check) from its file, once, at ingest."""
    if item.header is not None:
        ds: pydicom.Dataset = pydicom.dcmread(io.BytesIO(item.header), stop_before_pixels=True)
    else:
        with item.path.open("rb") as fh:
            ds = read_dataset(fh)
    return dataset_json_text(ds, memo)


def held_studies(case_id: Any) -> Select[str]:
    """Study UIDs of the case that the identity check holds (or an admin rejected);
    `case_id` a value or a bound parameter."""
    return select(HeldItem.key).where(
        HeldItem.case_id == case_id,
        HeldItem.kind == held.STUDY,
        # Plain comparisons, not IN (...): an IN list is expanded again at every execution.
        or_(*(HeldItem.state == state for state in held.OUT)),
    )


def _scoped(q: AnySelect, has_study: bool, has_series: bool, include_held: bool) -> AnySelect:
    """`q` narrowed to `:case_id` (its held studies left out unless `include_held`), and to
    `:study_uid` / `:series_uid` when given."""
    row = ImageInstance
    case: BindParameter[str] = bindparam("case_id")
    q = q.where(row.case_id == case)
    if not include_held:
        q = q.where(row.study_uid.not_in(held_studies(case)))
    if has_study:
        q = q.where(row.study_uid == bindparam("study_uid"))
    if has_series:
        q = q.where(row.series_uid == bindparam("series_uid"))
    return q


@functools.cache
def _listing(
    with_metadata: bool, has_study: bool, has_series: bool, include_held: bool
) -> AnySelect:
    """The instances of `:case_id` (narrowed as `_scoped`), as `_REF_COLUMNS` rows, in order."""
    row = ImageInstance
    columns = _REF_COLUMNS if with_metadata else _REF_COLUMNS[:-1]
    q = _scoped(select(*columns), has_study, has_series, include_held)
    return q.order_by(row.study_uid, row.series_uid, row.sop_uid)


@functools.cache
def _series_listing(has_study: bool, has_series: bool, include_held: bool) -> AnySelect:
    """Per series of `:case_id` (narrowed as `_scoped`): its first instance (lowest SOP
    Instance UID) as a `_REF_COLUMNS` row plus the series' instance count, one query."""
    row = ImageInstance
    groups = _scoped(
        select(
            row.study_uid,
            row.series_uid,
            func.min(row.sop_uid).label("first_uid"),
            func.count().label("instances"),
        ),
        has_study,
        has_series,
        include_held,
    ).group_by(row.study_uid, row.series_uid)
    g = groups.subquery("g")
    return (
        select(*_REF_COLUMNS, g.c.instances)
        .join(g, (row.case_id == bindparam("case_id")) & (row.sop_uid == g.c.first_uid))
        .order_by(g.c.study_uid, g.c.series_uid)
    )


_REF_COLUMNS = (  # InstanceRef's fields, in order
    ImageInstance.case_id,
    ImageInstance.study_uid,
    ImageInstance.series_uid,
    ImageInstance.sop_uid,
    ImageInstance.sop_class_uid,
    ImageInstance.transfer_syntax_uid,
    ImageInstance.sha256,
    ImageInstance.size,
    ImageInstance.orthanc_id,
    ImageInstance.dicom_json,
)


def _ref_of_columns(row: Sequence[Any]) -> InstanceRef:
    """An `InstanceRef` from a row of `_REF_COLUMNS` (or all but the last)."""
    return InstanceRef(*row)


def _ref(row: ImageInstance) -> InstanceRef:
    return InstanceRef(
        case_id=row.case_id,
        study_uid=row.study_uid,
        series_uid=row.series_uid,
        sop_uid=row.sop_uid,
        sop_class_uid=row.sop_class_uid,
        transfer_syntax_uid=row.transfer_syntax_uid,
        sha256=row.sha256,
        size=row.size,
        orthanc_id=row.orthanc_id,
        metadata_json=row.dicom_json,
    )


class FileImageStore(_IndexedStore):
    """Files under `<data_dir>/blobs/sha256/ab/cdef...` (content-addressed; shared across cases)."""

    backend = "file"

    def __init__(self, store: Store, data_dir: Path) -> None:
        super().__init__(store, data_dir)
        self.root = blob_dir(data_dir)

    def blob_path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:]

    def _place(self, item: RetrievedInstance) -> str | None:
        target = self.blob_path(item.sha256)
        if target.exists():
            item.path.unlink(missing_ok=True)  # same bytes already held (another case, a retry)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(item.path, target)  # atomic on one filesystem: staging is in data_dir
            except OSError:
                shutil.move(str(item.path), target)
        return None

    def open_instance(self, ref: InstanceRef) -> BinaryIO:
        try:
            return self.blob_path(ref.sha256).open("rb")
        except FileNotFoundError as exc:
            raise NotFoundError(f"image file of instance {ref.sop_uid} is missing") from exc

    def delete_case(self, case_id: str) -> int:
        """Drop the case's index rows and the files no other case uses."""
        count, freed = self._drop_rows(case_id, ImageInstance.sha256)
        for sha in freed:
            self.blob_path(sha).unlink(missing_ok=True)
        return count


class OrthancImageStore(_IndexedStore):
    """Instances STOW-RS'd into an Orthanc (whose DICOMweb then serves viewers); rows index them.

    The I/O is `connectors.orthanc.OrthancStorage`; this class only adds the per-case index.
    """

    backend = "orthanc"

    def __init__(self, store: Store, data_dir: Path, orthanc: OrthancStorage) -> None:
        super().__init__(store, data_dir)
        self.orthanc = orthanc

    def _place(self, item: RetrievedInstance) -> str | None:
        try:
            return self.orthanc.store_file(item.path, item.sop_uid)
        finally:
            item.path.unlink(missing_ok=True)

    def open_instance(self, ref: InstanceRef) -> BinaryIO:
        return self.orthanc.open_file(ref.orthanc_id or self.orthanc.lookup(ref.sop_uid))

    def delete_case(self, case_id: str) -> int:
        """Drop the case's index rows and the Orthanc instances no other case uses."""
        count, freed = self._drop_rows(case_id, ImageInstance.orthanc_id)
        for orthanc_id in freed:
            self.orthanc.delete(orthanc_id)
        return count
