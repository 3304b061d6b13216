"""Patient upload link helpers: a synthetic CD folder (small DICOM instances of one patient and
a DICOMDIR written by pydicom's FileSet) and plain-HTTP tus uploads with the link's token."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pydicom
import requests

from fhir_gateway.sandbox.cd import write_cd

# The patient of tests/api/test_documents.refer(jones=True) (the C-CDA fixture's).
JONES = {
    "PatientName": "Jones^Isabella",
    "PatientID": "98765432",
    "IssuerOfPatientID": "1.3.6.1.4.1.16517.1",
    "PatientBirthDate": "19501219",
    "PatientSex": "F",
}


def make_cd(
    folder: Path, count: int, patient: dict[str, str] = JONES, dicomdir: bool = True
) -> str:
    """`count` instances of one study of `patient` (the referral's, by default) in `folder`."""
    return write_cd(folder, count, patient, dicomdir)


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
