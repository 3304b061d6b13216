"""Patient upload links (issue 14 part 3): an admin creates a link for one case; the link uploads
into that case only (tus with the token in `Upload-Link`), shows only what it received, expires,
can be revoked; the token is stored as its SHA-256 only; every use is audited; no token in logs.

Real components: the app through TestClient, SQLite, the file image store, the job worker's
handlers run in this thread (`tests.jobs_for_tests`), pydicom's FileSet for the CD's DICOMDIR.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from fhir_gateway import job_handlers, jobs
from fhir_gateway.casebundle import normalise
from fhir_gateway.records import upload_links
from fhir_gateway.sandbox.cd import synthetic_instance
from fhir_gateway.store.models import (
    AuditRow,
    CaseDocument,
    HeldItem,
    Job,
    StoredResource,
    UploadLink,
    utcnow,
)
from tests.api.test_documents import TEXT_PDF, build, refer
from tests.integration.imaging.cases import make_case
from tests.upload_link_helpers import JONES, files_of, make_cd, tus_send

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def create(client, tokens, case_id: str, **body: Any) -> Any:
    return client.post(f"/cases/{case_id}/upload-links", json=body, headers=tokens.headers("admin"))


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def link_send(client, case_id: str, token: str, name: str, data: bytes, ctype: str = "") -> Any:
    return tus_send(client, f"/cases/{case_id}/uploads/", {"Upload-Link": token}, name, data, ctype)


def run_jobs(client) -> None:
    """Run every due job (the link's study rebuild, then the normalisation) in this thread."""
    store = client.app.state.store
    settings = client.app.state.settings
    job_handlers.register_all()
    with store.session() as s:  # the settle delay is for live bursts; here run at once
        for job in s.scalars(select(Job).where(Job.state == jobs.QUEUED)):
            job.run_at = utcnow() - timedelta(seconds=1)
    worker = jobs.Worker(store, settings, name="test", kinds=[upload_links.KIND, normalise.KIND])
    runs = 0
    while runs < 20 and worker.run_once():
        runs += 1


def audit_actions(client, case_id: str | None = None) -> list[tuple[str, str, str]]:
    with client.app.state.store.session() as s:
        rows = s.scalars(select(AuditRow).order_by(AuditRow.id)).all()
        return [
            (r.action, r.outcome, " ".join(r.entity or []))
            for r in rows
            if r.action.startswith("upload")
        ]


def test_create_list_revoke_and_the_token_is_stored_hashed(client, tokens) -> None:
    case_id = refer(client, tokens)
    resp = create(client, tokens, case_id)
    assert resp.status_code == 201, resp.text
    link = resp.json()
    token = token_of(link["url"])
    assert link["url"] == f"{client.app.state.settings.base_url}/upload/{token}"
    assert len(token) >= 43  # token_urlsafe(32): 256 bits
    days = __import__("datetime").datetime.fromisoformat(link["expires"]) - __import__(
        "datetime"
    ).datetime.fromisoformat(link["created"])
    assert days == timedelta(days=7)
    with client.app.state.store.session() as s:
        row = s.get(UploadLink, link["id"])
        assert row is not None
        assert row.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
        stored = " ".join(str(v) for v in vars(row).values())
    assert token not in stored
    listed = client.get(f"/cases/{case_id}/upload-links", headers=tokens.headers("admin"))
    assert listed.status_code == 200
    (item,) = listed.json()
    assert item["status"] == "active"
    assert "url" not in item
    assert token not in listed.text
    # expiry bounds: 30 days at most, an integer
    assert create(client, tokens, case_id, expiresInDays=31).status_code == 422
    assert create(client, tokens, case_id, expiresInDays="7").status_code == 400
    assert create(client, tokens, case_id, expiresInDays=30).status_code == 201
    # admin only; another case's link id is not found
    for role in ("ehr", "reviewer"):
        assert (
            client.post(f"/cases/{case_id}/upload-links", headers=tokens.headers(role)).status_code
            == 403
        )
    assert client.get(f"/upload/{token}").status_code == 200
    revoked = client.delete(
        f"/cases/{case_id}/upload-links/{link['id']}", headers=tokens.headers("admin")
    )
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked"
    page = client.get(f"/upload/{token}")
    assert page.status_code == 410
    assert "withdrawn" in page.text
    assert "text/html" in page.headers["content-type"]
    refused = client.post(
        f"/cases/{case_id}/uploads/",
        headers={"Tus-Resumable": "1.0.0", "Upload-Link": token, "Upload-Length": "5"},
    )
    assert refused.status_code == 410
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert (
        client.delete(
            f"/cases/{case_id}/upload-links/{'0' * 36}", headers=tokens.headers("admin")
        ).status_code
        == 404
    )


def test_expired_unknown_and_other_case_tokens_are_refused_audited_nothing_stored(
    client, tokens
) -> None:
    case_id = refer(client, tokens)
    other = make_case(client.app.state.store, "11111111-2222-3333-4444-555555555555")
    link = create(client, tokens, case_id).json()
    token = token_of(link["url"])
    # Another case through this link: not found (nothing of that case is revealed).
    wrong = client.post(
        f"/cases/{other}/uploads/",
        headers={"Tus-Resumable": "1.0.0", "Upload-Link": token, "Upload-Length": "5"},
    )
    assert wrong.status_code == 404
    unknown = client.get("/upload/" + "x" * 43)
    assert unknown.status_code == 404
    assert "not known" in unknown.text
    assert client.get("/upload/" + "x" * 43 + "/received").status_code == 404
    with client.app.state.store.session() as s:
        row = s.get(UploadLink, link["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    expired = client.get(f"/upload/{token}")
    assert expired.status_code == 410
    assert "expired" in expired.text
    with_data = client.post(
        f"/cases/{case_id}/uploads/",
        headers={"Tus-Resumable": "1.0.0", "Upload-Link": token, "Upload-Length": "5"},
    )
    assert with_data.status_code == 410
    assert "expired" in with_data.json()["issue"][0]["diagnostics"]
    tmp = client.app.state.settings.data_dir / "tmp" / "tus"
    assert not tmp.exists() or list(tmp.iterdir()) == []  # nothing stored
    refusals = [a for a in audit_actions(client) if a[0] == "upload-link.refused"]
    reasons = [a[2].split("reason:")[1] for a in refusals]
    assert reasons == ["other-case", "unknown", "unknown", "expired", "expired"]
    assert all(a[1] == "4" for a in refusals)


def test_cd_folder_and_a_pdf_through_the_link_reach_the_case(
    client, tokens, tmp_path, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    case_id = refer(client, tokens)
    link = create(client, tokens, case_id).json()
    token = token_of(link["url"])
    assert client.get(f"/upload/{token}").status_code == 200
    cd = tmp_path / "cd"
    make_cd(cd, 12)
    results = []
    for path in files_of(cd):
        name = path.relative_to(cd).as_posix()
        results.append(link_send(client, case_id, token, name, path.read_bytes()))
    results.append(
        link_send(client, case_id, token, "pathology.pdf", TEXT_PDF.read_bytes(), "application/pdf")
    )
    results.append(link_send(client, case_id, token, "setup.exe", b"MZ\x90\x00" + b"\x00" * 60))
    by_result = {r: [x for x in results if x["result"] == r] for r in ("accepted", "ignored")}
    assert len(by_result["accepted"]) == 13  # 12 instances + the PDF
    assert [x["file"] for x in by_result["ignored"]] == ["DICOMDIR"]
    refused = results[-1]
    assert refused["result"] == "rejected"
    assert refused["reason"]
    # the link's view names no UID, document id or patient
    assert all(set(x) <= {"file", "result", "kind", "reason", "instances"} for x in results)
    # a dozen instances queued one settled rebuild, not twelve
    with client.app.state.store.session() as s:
        rebuilds = s.scalars(select(Job).where(Job.kind == upload_links.KIND)).all()
    assert len(rebuilds) == 1
    run_jobs(client)
    with client.app.state.store.session() as s:
        studies = [
            r.body
            for r in s.scalars(
                select(StoredResource).where(
                    StoredResource.case_id == case_id,
                    StoredResource.resource_type == "ImagingStudy",
                )
            )
        ]
    assert [s["numberOfInstances"] for s in studies] == [12]
    with client.app.state.store.session() as s:
        queued = s.scalars(select(Job).where(Job.kind == normalise.KIND)).all()
    assert len(queued) >= 2  # by the PDF and by the studies' rebuild
    # the pulls of this referral never finish here (no EHR): normalise as the job would
    bundle = build(client, client.app.state.settings, case_id)
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types.count("ImagingStudy") == 1
    assert types.count("DocumentReference") >= 1
    listed = client.get(f"/upload/{token}/received")
    assert listed.status_code == 200
    body = listed.json()
    assert (body["accepted"], body["rejected"], len(body["files"])) == (13, 1, 15)
    # audited: page open, each create, each file, the list
    actions = [a[0] for a in audit_actions(client)]
    assert actions.count("upload-link.open") == 1
    assert actions.count("upload.create") == 15
    assert actions.count("upload-link.file") == 15
    assert actions.count("upload-link.list") == 1
    assert actions.count("upload-link.create") == 1
    # the token never reaches a log line (the access line carries the route template)
    text = "\n".join(str(r.msg) for r in caplog.records if not r.name.startswith("httpx"))
    assert token not in text
    assert "/upload/{token}" in text


def test_a_study_held_by_one_instance_stays_held_when_later_ones_match(
    client, tokens, tmp_path
) -> None:
    """Identity (DESIGN "right patient"): instances arrive one by one; the first of another
    patient holds the study, and the matching ones after it do not clear the hold."""
    case_id = refer(client, tokens)
    token = token_of(create(client, tokens, case_id).json()["url"])
    study, series = generate_uid(), generate_uid()
    other = {**JONES, "PatientName": "Smith^John", "PatientBirthDate": "19600101"}
    for n, patient in enumerate((other, JONES, JONES), start=1):
        path = tmp_path / f"IM{n}"
        synthetic_instance(study, series, n, patient).save_as(path, enforce_file_format=True)
        result = link_send(client, case_id, token, path.name, path.read_bytes())
        assert result["result"] == "accepted"  # received; the hold is the team's business
    with client.app.state.store.session() as s:
        (item,) = s.scalars(select(HeldItem).where(HeldItem.case_id == case_id)).all()
    assert item.key == study
    assert item.state == "held"
    run_jobs(client)
    studies = client.get(f"/cases/{case_id}/dicom-web/studies", headers=tokens.headers("admin"))
    assert studies.json() == []  # held: not in the per-case DICOMweb


def test_a_link_upload_resumes_only_through_its_link_and_stops_when_revoked(client, tokens) -> None:
    case_id = refer(client, tokens)
    first = create(client, tokens, case_id).json()
    token = token_of(first["url"])
    other = token_of(create(client, tokens, case_id).json()["url"])
    data = TEXT_PDF.read_bytes()
    tus = {"Tus-Resumable": "1.0.0", "Upload-Link": token}
    created = client.post(
        f"/cases/{case_id}/uploads/", headers={**tus, "Upload-Length": str(len(data))}
    )
    assert created.status_code == 201
    url = created.headers["Location"].replace("http://testserver", "")
    patch = {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
    assert client.patch(url, content=data[:100], headers=patch).status_code == 204
    assert client.head(url, headers=tus).headers["Upload-Offset"] == "100"
    # neither another link of the same case nor the partner's EHR may continue or see it
    assert client.head(url, headers={**tus, "Upload-Link": other}).status_code == 404
    ehr = tokens.headers("ehr", **{"Tus-Resumable": "1.0.0"})
    assert client.head(url, headers=ehr).status_code == 404
    client.delete(f"/cases/{case_id}/upload-links/{first['id']}", headers=tokens.headers("admin"))
    rest = client.patch(url, content=data[100:], headers={**patch, "Upload-Offset": "100"})
    assert rest.status_code == 410
    with client.app.state.store.session() as s:
        assert s.scalars(select(CaseDocument).where(CaseDocument.case_id == case_id)).all() == []
