"""Session-scoped real Orthanc servers (+ DICOMweb plugin) loaded with the DICOM fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from fhir_gateway.imaging.store import FileImageStore
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store, open_store
from tests.servers.orthanc import OrthancServer, run_orthanc

DICOM = Path(__file__).resolve().parents[3] / "fixtures" / "dicom"
# The corpus files Orthanc accepts (chrSQEncoding has no UIDs; chrFrenMulti repeats chrFren's
# SOP Instance UID), one study per patient or more.
CORPUS = sorted(
    p
    for p in DICOM.rglob("*.dcm")
    if "bad" not in p.parts and p.name not in {"chrSQEncoding.dcm", "chrFrenMulti.dcm"}
)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """The source PACS: a real Orthanc holding every corpus file."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc") / "pacs", aet="SOURCEPACS") as server:
        for path in CORPUS:
            server.upload(path.read_bytes())
        yield server


@pytest.fixture(scope="session")
def corpus_studies() -> dict[str, list[Path]]:
    """Study Instance UID -> files of that study."""
    out: dict[str, list[Path]] = {}
    for path in CORPUS:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.setdefault(str(ds.StudyInstanceUID), []).append(path)
    return out


@pytest.fixture
def gw_store(settings: Settings) -> Iterator[Store]:
    s = open_store(settings.db_url)
    yield s
    s.dispose()


@pytest.fixture
def file_store(gw_store: Store, settings: Settings) -> FileImageStore:
    return FileImageStore(gw_store, settings.data_dir)


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s
