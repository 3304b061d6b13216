"""Patient upload link helpers: a synthetic CD folder (small DICOM instances of one patient and
a DICOMDIR written by pydicom's FileSet) and plain-HTTP tus uploads with the link's token."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fhir_gateway.records.uploads import close_fileset

# The patient of tests/api/test_documents.refer(jones=True) (the C-CDA fixture's).
JONES = {
    "PatientName": "Jones^Isabella",
    "PatientID": "98765432",
    "IssuerOfPatientID": "1.3.6.1.4.1.16517.1",
    "PatientBirthDate": "19501219",
    "PatientSex": "F",
}


def synthetic_instance(study: str, series: str, number: int, patient: dict[str, str]) -> Dataset:
    """One 8x8 CT image (synthetic, about 1 KB)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    for key, value in patient.items():
        setattr(ds, key, value)
    ds.Modality, ds.StudyDate, ds.StudyTime = "CT", "20240105", "101500"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.StudyDescription, ds.SeriesDescription = "CT chest", "axial"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes((number + i) % 256 for i in range(128))
    return ds


def make_cd(
    folder: Path, count: int, patient: dict[str, str] = JONES, dicomdir: bool = True
) -> str:
    """`count` instances of one study and series under `folder` (with a DICOMDIR written by
    pydicom's FileSet, or as plain files without one). Returns the study UID."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    datasets = [synthetic_instance(study, series, n + 1, patient) for n in range(count)]
    if not dicomdir:
        for n, ds in enumerate(datasets):
            ds.save_as(folder / f"IM{n:05d}", enforce_file_format=True)
        return study
    fs = FileSet()
    for ds in datasets:
        fs.add(ds)
    fs.write(folder)
    close_fileset(fs)
    return study


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def tus_send(
    http: Any, endpoint: str, headers: dict[str, str], name: str, data: bytes, ctype: str = ""
) -> dict[str, Any]:
    """Create, send in one PATCH, read the result (a `requests.Session` or a `TestClient`)."""
    tus = {"Tus-Resumable": "1.0.0", **headers}
    meta = f"filename {b64(name)}" + (f",filetype {b64(ctype)}" if ctype else "")
    created = http.post(
        endpoint, headers={**tus, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
    )
    assert created.status_code == 201, created.text
    url = created.headers["Location"]
    if url.startswith("http://testserver"):
        url = url[len("http://testserver") :]
    body_key = "data" if isinstance(http, requests.Session) else "content"
    done = http.patch(
        url,
        headers={**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        **{body_key: data},
    )
    assert done.status_code == 204, done.text
    status = http.get(url, headers=headers)
    assert status.status_code == 200, status.text
    result: dict[str, Any] = status.json()["result"]
    return result


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def is_dicomdir(path: Path) -> bool:
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10"
