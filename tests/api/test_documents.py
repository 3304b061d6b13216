"""Every record reaches the case: documents pulled from the EHR and uploaded by the partner are
read by their content, mapped, identity-checked and shown in the case bundle.

Real components: the app through TestClient, SQLite, the file image store, the sandbox EHR on
loopback for pulled attachments, pydicom's FileSet to build a DICOMDIR.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.fileset import FileSet
from sqlalchemy import select

from fhir_gateway import job_handlers, jobs
from fhir_gateway.casebundle import normalise
from fhir_gateway.records.uploads import close_fileset
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import (
    AuditRow,
    CaseBundleState,
    CaseDocument,
    HeldItem,
    Job,
    StoredResource,
)
from tests.api.test_case_bundle import store_of
from tests.conftest import FHIR_JSON, FIXTURES, SYNTHEA, Tokens, load_fixture, partner_sandbox

CCD = FIXTURES / "ccda" / "CCD_2.xml"  # Isabella Jones, F, 1950-12-19, MRN 98765432
OTHER_CCD = FIXTURES / "ccda" / "170.314B2_Amb_CCD.xml"  # another patient
ORU = FIXTURES / "hl7v2" / "ORU-R01-01.hl7"
TEXT_PDF = FIXTURES / "pdf" / "text-report.pdf"
SCANNED_PDF = FIXTURES / "pdf" / "scanned-report.pdf"
CT = FIXTURES / "dicom" / "ct" / "CT_small.dcm"
MR = FIXTURES / "dicom" / "mr" / "MR_small.dcm"
CCD_MRN = {"system": "urn:oid:1.3.6.1.4.1.16517.1", "value": "98765432"}


# --------------------------------------------------------------------------- helpers


def refer(client: TestClient, tokens: Tokens, *, jones: bool = True) -> str:
    """A referral; with `jones`, its patient is the C-CDA fixture's (so that document matches)."""
    bundle: dict[str, Any] = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
    if jones:
        for entry in bundle["entry"]:
            r = entry["resource"]
            if r["resourceType"] == "Patient":
                r["identifier"] = [CCD_MRN]
                r["name"] = [{"family": "Jones", "given": ["Isabella"]}]
                r["gender"], r["birthDate"] = "female", "1950-12-19"
    resp = client.post("/fhir", json=bundle, headers=tokens.headers("ehr") | FHIR_JSON)
    assert resp.status_code == 200, resp.text
    return str(client.get("/cases", headers=tokens.headers("admin")).json()[0]["id"])


def upload(
    client: TestClient, tokens: Tokens, case_id: str, *files: tuple[str, bytes, str], role="ehr"
):
    return client.post(
        f"/cases/{case_id}/documents",
        files=[("file", f) for f in files],
        headers=tokens.headers(role),
    )


def v2_for_jones() -> bytes:
    """The ORU fixture with its PID naming the C-CDA's patient (MRN in the same OID system)."""
    lines = ORU.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    out = []
    for line in lines:
        if line.startswith(b"PID|"):
            line = (
                b"PID|1||98765432^^^&1.3.6.1.4.1.16517.1&ISO^MR||Jones^Isabella^^^^^L||19501219|F"
            )
        out.append(line)
    return b"\r".join(out)


def build(client: TestClient, settings: Settings, case_id: str) -> Any:
    normalise.normalise_case(store_of(client), settings, case_id)
    resp = client.get(
        f"/cases/{case_id}/bundle", headers=Tokens(settings.data_dir).headers("admin")
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def of_type(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def content_of(client: TestClient, tokens: Tokens, url: str, role: str = "admin"):
    return client.get(url.replace("http://testserver", ""), headers=tokens.headers(role))


# --------------------------------------------------------------------------- uploads


def test_ccda_upload_reaches_the_bundle_with_provenance(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    resp = upload(client, tokens, case_id, ("note.xml", CCD.read_bytes(), "application/xml"))
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["files"]
    assert result["result"] == "accepted"
    assert result["kind"] == "ccda"
    assert "held" not in result  # the recordTarget is the referral's patient
    bundle = build(client, settings, case_id)
    docrefs = of_type(bundle, "DocumentReference")
    ours = [
        d
        for d in docrefs
        if any("/documents/" in (c["attachment"].get("url") or "") for c in d["content"])
    ]
    assert len(ours) == 1
    assert ours[0]["content"][0]["attachment"]["contentType"] == "application/cda+xml"
    # what the C-CDA mapper made is in the case, its Provenance pointing at the document
    assert len(of_type(bundle, "Observation")) >= 11
    assert of_type(bundle, "DiagnosticReport")
    provs = [
        p
        for p in of_type(bundle, "Provenance")
        if any(
            e["what"].get("reference") == f"DocumentReference/{ours[0]['id']}"
            for e in p.get("entity", [])
        )
    ]
    assert len(provs) == 1
    assert len(provs[0]["target"]) > 5
    # the original, retrievable: right type, no-store, audited
    got = content_of(client, tokens, ours[0]["content"][0]["attachment"]["url"], "ehr")
    assert got.status_code == 200
    assert got.content == CCD.read_bytes()
    assert got.headers["content-type"].startswith("application/cda+xml")
    assert got.headers["cache-control"] == "no-store"
    with client.app.state.store.session() as s:
        actions = set(s.scalars(select(AuditRow.action).where(AuditRow.case_id == case_id)))
    assert {"document.receive", "document.read"} <= actions


def test_pdf_with_text_kept_beside_the_original_and_counts_as_pathology(
    client, tokens, settings
) -> None:
    case_id = refer(client, tokens)
    resp = upload(client, tokens, case_id, ("path.pdf", TEXT_PDF.read_bytes(), "application/pdf"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["files"][0]["kind"] == "pdf"
    bundle = build(client, settings, case_id)
    (doc,) = [d for d in of_type(bundle, "DocumentReference") if len(d["content"]) == 2]
    original, text = (c["attachment"] for c in doc["content"])
    assert original["contentType"] == "application/pdf"
    assert text["contentType"].startswith("text/plain")
    got = content_of(client, tokens, text["url"])
    assert got.status_code == 200
    assert "pathology" in got.text.lower()
    pdf = content_of(client, tokens, original["url"])
    assert pdf.content == TEXT_PDF.read_bytes()
    assert pdf.headers["content-type"] == "application/pdf"
    # the authored report says "pathology": typed as a pathology study, so completeness has it
    assert doc["type"]["coding"][0]["code"] == "11526-1"
    state = _state(client, case_id)
    assert state.summary["pathology_report"]["present"] is True


def _state(client: TestClient, case_id: str) -> Any:
    with store_of(client).session() as s:
        return s.get(CaseBundleState, case_id)


def test_scanned_pdf_flagged_no_text(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    resp = upload(
        client, tokens, case_id, ("scan.pdf", SCANNED_PDF.read_bytes(), "application/pdf")
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["files"][0]["flags"] == ["no text (scanned)"]
    bundle = build(client, settings, case_id)
    (doc,) = [
        d
        for d in of_type(bundle, "DocumentReference")
        if any(t.get("code") == "no-text-layer" for t in (d.get("meta") or {}).get("tag", []))
    ]
    assert len(doc["content"]) == 1  # no text to keep beside it
    issues = _state(client, case_id).issues
    assert any("no text (scanned)" in i["diagnostics"] for i in issues)


def test_hl7v2_upload_mapped(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    resp = upload(client, tokens, case_id, ("oru.hl7", v2_for_jones(), "x-application/hl7-v2+er7"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["files"][0]["kind"] == "hl7v2"
    assert "held" not in resp.json()["files"][0]
    bundle = build(client, settings, case_id)
    assert of_type(bundle, "DiagnosticReport")
    assert len(of_type(bundle, "Patient")) == 1


def test_document_of_another_patient_is_held(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    resp = upload(client, tokens, case_id, ("x.xml", OTHER_CCD.read_bytes(), "application/xml"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["files"][0]["held"] == 1
    bundle = build(client, settings, case_id)
    assert not [d for d in of_type(bundle, "DocumentReference")]
    with client.app.state.store.session() as s:
        item = s.scalars(select(HeldItem).where(HeldItem.case_id == case_id)).one()
        doc = s.scalars(select(CaseDocument).where(CaseDocument.case_id == case_id)).one()
    assert item.source.endswith(doc.id)
    assert "name" in item.fields["differ"]
    # its content is not served to the partner while held
    url = f"/cases/{case_id}/documents/{doc.id}/content"
    assert client.get(url, headers=tokens.headers("ehr")).status_code == 404


def test_rejected_files_store_nothing_and_say_why(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    resp = upload(
        client,
        tokens,
        case_id,
        ("a.pdf", b"not a pdf at all", "application/pdf"),
        ("b.bin", bytes(range(256)) * 4, "application/octet-stream"),
        ("c.xml", b"<ClinicalDocument xmlns='urn:hl7-org:v3'/>", "application/xml"),
        ("ok.pdf", TEXT_PDF.read_bytes(), "application/pdf"),
    )
    assert resp.status_code == 200
    files = resp.json()["files"]
    assert [f["result"] for f in files] == ["rejected", "rejected", "rejected", "accepted"]
    assert "declared as application/pdf" in files[0]["reason"]
    assert files[0]["outcome"]["resourceType"] == "OperationOutcome"
    assert "unsupported content" in files[1]["reason"]
    assert "recordTarget" in files[2]["reason"]
    with client.app.state.store.session() as s:
        assert len(s.scalars(select(CaseDocument)).all()) == 1
    only_bad = upload(client, tokens, case_id, ("a.pdf", b"nope", "application/pdf"))
    assert only_bad.status_code == 415


def test_upload_access_and_limits(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    pdf = ("p.pdf", TEXT_PDF.read_bytes(), "application/pdf")
    assert upload(client, tokens, case_id, pdf, role="reviewer").status_code == 403
    other = tokens.headers("ehr", partner="someone-else")
    resp = client.post(f"/cases/{case_id}/documents", files=[("file", pdf)], headers=other)
    assert resp.status_code == 403
    assert upload(client, tokens, case_id, pdf, role="admin").status_code == 200
    client.app.state.settings.limits.max_upload_bytes = 1000
    big = upload(client, tokens, case_id, pdf)
    assert big.status_code == 413
    assert big.json()["resourceType"] == "OperationOutcome"


def test_upload_queues_normalise_once(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    for _ in range(2):
        upload(client, tokens, case_id, ("p.pdf", TEXT_PDF.read_bytes(), "application/pdf"))
    with client.app.state.store.session() as s:
        keys = s.scalars(
            select(Job.dedup_key).where(Job.case_id == case_id, Job.kind == "normalise_case")
        ).all()
    assert len([k for k in keys if k and ":received:" in k]) == 1


# --------------------------------------------------------------------------- DICOM


def _dicom_for_case(tmp: Path, src: Path, name: str) -> Path:
    """A fixture instance renamed to the referral's patient (so it is not held)."""
    ds = pydicom.dcmread(src)
    ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Jones^Isabella", "19501219", "F"
    ds.PatientID, ds.IssuerOfPatientID = "98765432", "1.3.6.1.4.1.16517.1"
    out = tmp / name
    ds.save_as(out)
    return out


def _studies(client: TestClient, tokens: Tokens, case_id: str) -> Any:
    resp = client.get(f"/cases/{case_id}/dicom-web/studies", headers=tokens.headers("admin"))
    assert resp.status_code == 200
    return resp.json()


def test_stow_rs_per_instance_result(client, tokens, settings, tmp_path) -> None:
    case_id = refer(client, tokens)
    ct = _dicom_for_case(tmp_path, CT, "ct.dcm").read_bytes()
    boundary = "stowboundary"
    body = (
        b"".join(
            b"--"
            + boundary.encode()
            + b"\r\nContent-Type: application/dicom\r\n\r\n"
            + part
            + b"\r\n"
            for part in (ct, b"garbage, not dicom")
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    resp = client.post(
        f"/cases/{case_id}/dicom-web/studies",
        content=body,
        headers=tokens.headers("ehr", **{"Content-Type": ctype}),
    )
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    (stored,) = answer["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [pydicom.dcmread(io.BytesIO(ct)).SOPInstanceUID]
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert len(_studies(client, tokens, case_id)) == 1
    bundle = build(client, settings, case_id)
    assert len(of_type(bundle, "ImagingStudy")) == 1
    wrong = client.post(
        f"/cases/{case_id}/dicom-web/studies",
        content=body,
        headers=tokens.headers("ehr", **{"Content-Type": "application/dicom"}),
    )
    assert wrong.status_code == 415


def _zip(files: dict[str, Path]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, path in files.items():
            zf.write(path, name)
    return buf.getvalue()


@pytest.mark.parametrize("with_dicomdir", [True, False])
def test_dicom_cd_zip(client, tokens, settings, tmp_path, with_dicomdir) -> None:
    case_id = refer(client, tokens)
    ct = _dicom_for_case(tmp_path, CT, "ct.dcm")
    mr = _dicom_for_case(tmp_path, MR, "mr.dcm")
    if with_dicomdir:
        fs = FileSet()
        fs.add(pydicom.dcmread(ct))
        fs.add(pydicom.dcmread(mr))
        cd = tmp_path / "cd"
        fs.write(cd)
        close_fileset(fs)
        members = {p.relative_to(cd).as_posix(): p for p in cd.rglob("*") if p.is_file()}
        assert "DICOMDIR" in members
    else:
        members = {"IMAGES/IM0001": ct, "IMAGES/IM0002": mr, "README.TXT": CCD}
    resp = upload(client, tokens, case_id, ("cd.zip", _zip(members), "application/zip"))
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["files"]
    assert result["result"] == "accepted"
    assert result["instances"] == 2
    assert result["flags"] == [f"read via {'DICOMDIR' if with_dicomdir else 'scan'}"]
    assert len(_studies(client, tokens, case_id)) == 2
    bundle = build(client, settings, case_id)
    assert len(of_type(bundle, "ImagingStudy")) == 2


def test_zip_without_dicom_rejected(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    resp = upload(client, tokens, case_id, ("x.zip", _zip({"a.txt": CCD}), "application/zip"))
    assert resp.status_code == 422
    assert "no DICOM instance" in resp.json()["files"][0]["reason"]


def test_uploaded_dicom_of_another_patient_held(client, tokens, settings) -> None:
    case_id = refer(client, tokens)
    resp = upload(client, tokens, case_id, ("ct.dcm", CT.read_bytes(), "application/dicom"))
    assert resp.status_code == 200
    assert resp.json()["files"][0]["held"] == 1
    assert _studies(client, tokens, case_id) == []


# --------------------------------------------------------------------------- tus


def _tus(tokens: Tokens, **extra: str) -> dict[str, str]:
    return tokens.headers("ehr", **{"Tus-Resumable": "1.0.0", **extra})


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def test_tus_upload_interrupted_and_resumed(client, tokens, settings) -> None:
    import hashlib

    case_id = refer(client, tokens)
    data = TEXT_PDF.read_bytes()
    opts = client.options(f"/cases/{case_id}/uploads/", headers=tokens.headers("ehr"))
    assert "checksum" in opts.headers["Tus-Extension"]
    created = client.post(
        f"/cases/{case_id}/uploads/",
        headers=_tus(
            tokens,
            **{
                "Upload-Length": str(len(data)),
                "Upload-Metadata": f"filename {_b64('r.pdf')},filetype {_b64('application/pdf')}",
            },
        ),
    )
    assert created.status_code == 201, created.text
    url = created.headers["Location"].replace("http://testserver", "")
    half = len(data) // 2
    patch = {"Content-Type": "application/offset+octet-stream"}
    first = client.patch(
        url, content=data[:half], headers=_tus(tokens, **patch, **{"Upload-Offset": "0"})
    )
    assert first.status_code == 204
    assert first.headers["Upload-Offset"] == str(half)
    # the connection dropped: the client asks where to resume
    head = client.head(url, headers=_tus(tokens))
    assert head.headers["Upload-Offset"] == str(half)
    assert head.headers["Cache-Control"] == "no-store"
    # a wrong offset is refused; a wrong checksum keeps nothing
    assert (
        client.patch(
            url, content=data[half:], headers=_tus(tokens, **patch, **{"Upload-Offset": "0"})
        ).status_code
        == 409
    )
    bad = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    mismatch = client.patch(
        url,
        content=data[half:],
        headers=_tus(
            tokens, **patch, **{"Upload-Offset": str(half), "Upload-Checksum": f"sha1 {bad}"}
        ),
    )
    assert mismatch.status_code == 460
    assert client.head(url, headers=_tus(tokens)).headers["Upload-Offset"] == str(half)
    good = base64.b64encode(hashlib.sha256(data[half:]).digest()).decode()
    done = client.patch(
        url,
        content=data[half:],
        headers=_tus(
            tokens, **patch, **{"Upload-Offset": str(half), "Upload-Checksum": f"sha256 {good}"}
        ),
    )
    assert done.status_code == 204
    assert done.headers["Upload-Result"] == "accepted"
    status = client.get(url, headers=tokens.headers("ehr")).json()
    assert status["result"]["kind"] == "pdf"
    with client.app.state.store.session() as s:
        doc = s.scalars(select(CaseDocument).where(CaseDocument.case_id == case_id)).one()
    assert doc.size == len(data)
    # another partner cannot see it; termination of a new upload removes it
    assert (
        client.head(url, headers=tokens.headers("admin", **{"Tus-Resumable": "1.0.0"})).status_code
        == 404
    )
    again = client.post(
        f"/cases/{case_id}/uploads/", headers=_tus(tokens, **{"Upload-Length": "10"})
    )
    url2 = again.headers["Location"].replace("http://testserver", "")
    assert client.delete(url2, headers=_tus(tokens)).status_code == 204
    assert client.head(url2, headers=_tus(tokens)).status_code == 404
    assert (
        client.post(
            f"/cases/{case_id}/uploads/", headers=tokens.headers("ehr", **{"Upload-Length": "10"})
        ).status_code
        == 412
    )


# --------------------------------------------------------------------------- pulled


@pytest.fixture
def ehr_with_pdf(settings: Settings, tmp_path: Path):
    """The sandbox EHR holding Lourdes Alcantar's record plus a DocumentReference with an
    inline PDF pathology report (started before the app, which reads the partners file)."""
    data = tmp_path / "ehr"
    data.mkdir()
    bundle = json.loads((SYNTHEA / "colon_Lourdes_Alcantar.json").read_text())
    patient = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    bundle["entry"].append(
        {
            "fullUrl": f"urn:uuid:{PULLED_DOC}",
            "resource": {
                "resourceType": "DocumentReference",
                "id": PULLED_DOC,
                "status": "current",
                "type": {"coding": [{"system": "http://loinc.org", "code": "11526-1"}]},
                "subject": {"reference": f"urn:uuid:{patient['id']}"},
                "date": "2024-03-01T10:00:00Z",
                "content": [
                    {
                        "attachment": {
                            "contentType": "application/pdf",
                            "data": base64.b64encode(TEXT_PDF.read_bytes()).decode(),
                        }
                    }
                ],
            },
            "request": {"method": "POST", "url": "DocumentReference"},
        }
    )
    (data / "patient.json").write_text(json.dumps(bundle))
    server = partner_sandbox(settings, data)
    partners = settings.data_dir / "partners.toml"
    text = partners.read_text().replace(
        'base_url = "http://127.0.0.1:8181/fhir"', f'base_url = "{server.base_url}"', 1
    )
    partners.write_text(text)
    yield server
    server.stop()


PULLED_DOC = "0b7c6b9e-1f7e-4c5a-9c77-0d9c4c1b0001"


def test_pulled_pdf_attachment_is_read_into_the_case(
    ehr_with_pdf, client, tokens, settings
) -> None:
    """A DocumentReference pulled from the EHR with a PDF: read, its text kept, in the bundle,
    and the pathology report counted by completeness."""
    case_id = refer(client, tokens, jones=False)
    job_handlers.register_all()
    store = client.app.state.store
    worker = jobs.Worker(store, settings)
    assert worker.run_once()  # pull_fhir
    with store.session() as s:
        docs = s.scalars(select(CaseDocument).where(CaseDocument.case_id == case_id)).all()
        rows = s.scalars(select(StoredResource).where(StoredResource.case_id == case_id)).all()
    pdfs = [d for d in docs if d.kind == "pdf"]
    assert len(pdfs) == 1
    assert pdfs[0].origin == "pulled"
    assert pdfs[0].text_sha256
    assert pdfs[0].attached_to == f"DocumentReference/{PULLED_DOC}"
    assert any(r.source.endswith(pdfs[0].id) for r in rows)
    result = build(client, settings, case_id)
    with_text = [
        d
        for d in of_type(result, "DocumentReference")
        if any(
            c["attachment"].get("contentType", "").startswith("text/plain")
            and "/documents/" in c["attachment"].get("url", "")
            for c in d["content"]
        )
    ]
    assert with_text, "the pulled PDF's DocumentReference carries its text"
    assert _state(client, case_id).summary["pathology_report"]["present"] is True
