"""A file-backed sandbox PACS: DICOMweb (QIDO-RS + WADO-RS) over a folder of .dcm files.

For the demo and tests when Orthanc is not installed. It answers the same way as the per-case
DICOMweb (`fhir_gateway.api.dicomweb`, whose serving functions it reuses): DICOM JSON searches
with `limit`/`offset` and a `Warning: 299` when more remain, and retrievals streamed as
`multipart/related; type="application/dicom"` with the files' bytes as they are. No auth.

    with PacsServer(Path("fixtures/dicom/series_77654033_CT2")) as pacs:
        client = DicomwebClient(requests.Session(), pacs.base_url)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import structlog
import uvicorn
from fastapi import FastAPI, Request, Response
from pydicom.errors import InvalidDicomError

from fhir_gateway.api import dicomweb as dw
from fhir_gateway.api.responses import add_error_handlers
from fhir_gateway.imaging.store import InstanceRef, dataset_json, instance_json
from fhir_gateway.sandbox.server import AppServer

log = structlog.get_logger(__name__)


class FolderSource:
    """The .dcm files under a folder (indexed once, headers only), as a DICOMweb source."""

    def __init__(self, folder: Path) -> None:
        self.paths: dict[str, Path] = {}
        self._refs: list[InstanceRef] = []
        skipped = 0
        for path in sorted(folder.rglob("*.dcm")):
            ref = _index(path)
            if ref is None or ref.sop_uid in self.paths:
                skipped += 1  # not DICOM, no UIDs, or a SOP Instance UID seen before
                continue
            self.paths[ref.sop_uid] = path
            self._refs.append(ref)
        self._refs.sort(key=lambda r: (r.study_uid, r.series_uid, r.sop_uid))
        log.info("pacs.indexed", instances=len(self._refs), skipped=skipped)

    def iter_instances(
        self,
        case_id: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
        *,
        with_metadata: bool = False,  # always in memory here
    ) -> Iterator[InstanceRef]:
        for ref in self._refs:
            if (study_uid is None or ref.study_uid == study_uid) and (
                series_uid is None or ref.series_uid == series_uid
            ):
                yield ref

    def iter_series(
        self, case_id: str, study_uid: str | None = None, series_uid: str | None = None
    ) -> Iterator[tuple[InstanceRef, int]]:
        groups: dict[tuple[str, str], list[InstanceRef]] = {}
        for ref in self.iter_instances(case_id, study_uid, series_uid):
            groups.setdefault((ref.study_uid, ref.series_uid), []).append(ref)
        for members in groups.values():
            yield members[0], len(members)

    def open_instance(self, ref: InstanceRef) -> BinaryIO:
        return self.paths[ref.sop_uid].open("rb")

    def metadata(self, ref: InstanceRef) -> dict[str, Any]:
        if ref.metadata_json is not None:
            out: dict[str, Any] = json.loads(ref.metadata_json)
            return out
        with self.open_instance(ref) as fh:
            return instance_json(fh)


def _index(path: Path) -> InstanceRef | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
        ts = ds.file_meta.TransferSyntaxUID
    except (InvalidDicomError, AttributeError, OSError, ValueError):
        return None
    return InstanceRef(
        case_id="",
        study_uid=str(uids[0]),
        series_uid=str(uids[1]),
        sop_uid=str(uids[2]),
        sop_class_uid=str(uids[3]),
        transfer_syntax_uid=str(ts),
        sha256="",
        size=path.stat().st_size,
        metadata_json=json.dumps(dataset_json(ds), ensure_ascii=False, separators=(",", ":")),
    )


def create_pacs_app(folder: Path, root: str = "/dicom-web") -> FastAPI:
    """The sandbox PACS over `folder` (searched recursively for *.dcm)."""
    source = FolderSource(folder)
    app = FastAPI(title="fhir-gateway sandbox PACS")
    app.state.source = source
    add_error_handlers(app)

    def base(request: Request) -> str:
        return f"{str(request.base_url).rstrip('/')}{root}"

    def qido(
        request: Request, level: str, study: str | None = None, series: str | None = None
    ) -> Response:
        params = request.query_params.multi_items()
        found, total = dw.search(source, "", base(request), level, params, study, series)
        host = request.url.hostname or "pacs"
        return dw.search_response(found, total, dw.offset_of(params), host)

    def wado(
        request: Request, study: str, series: str | None = None, sop: str | None = None
    ) -> Response:
        refs = dw.refs_of(source, "", study, series, sop)
        return dw.retrieve(source, refs, base(request), request.headers.get("accept", ""))

    @app.get(f"{root}/studies")
    def studies(request: Request) -> Response:
        return qido(request, "studies")

    @app.get(f"{root}/studies/{{study}}/series")
    def series_of(request: Request, study: str) -> Response:
        return qido(request, "series", study)

    @app.get(f"{root}/studies/{{study}}/series/{{series}}/instances")
    def instances_of(request: Request, study: str, series: str) -> Response:
        return qido(request, "instances", study, series)

    @app.get(f"{root}/studies/{{study}}")
    def study_retrieve(request: Request, study: str) -> Response:
        return wado(request, study)

    @app.get(f"{root}/studies/{{study}}/series/{{series}}")
    def series_retrieve(request: Request, study: str, series: str) -> Response:
        return wado(request, study, series)

    @app.get(f"{root}/studies/{{study}}/series/{{series}}/instances/{{sop}}")
    def instance_retrieve(request: Request, study: str, series: str, sop: str) -> Response:
        return wado(request, study, series, sop)

    return app


def run_pacs(folder: Path, port: int, host: str = "127.0.0.1") -> None:
    """Serve the sandbox PACS until interrupted (`fhir-gateway pacs FOLDER --port P`)."""
    uvicorn.run(create_pacs_app(folder), host=host, port=port, log_level="warning")


class PacsServer(AppServer):
    """The sandbox PACS on a free loopback port in a thread; `base_url` is its DICOMweb root."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        super().__init__(create_pacs_app(folder), port)

    @property
    def base_url(self) -> str:
        return f"{self.url}/dicom-web"
