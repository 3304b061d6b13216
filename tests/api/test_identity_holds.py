"""Right patient: what a pull brings in that is not the referral's patient is held out of the
case (bundle and per-case DICOMweb), shown with the names of the differing fields, and released
or rejected by an admin (audited); a release re-normalises the case (docs/identity.md).

Images come from the sandbox PACS (a folder of real DICOM files served over DICOMweb) through
the imaging job's `pull_for_partner`; records from the sandbox EHR through the `pull_fhir` job.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fhir_gateway import job_handlers, jobs
from fhir_gateway.casebundle import held, normalise
from fhir_gateway.imaging.job import pull_for_partner
from fhir_gateway.sandbox import SandboxServer
from fhir_gateway.sandbox.pacs import PacsServer
from fhir_gateway.settings import DicomwebEndpoint, Partner, PartnerIdentifier, Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import AuditRow, FhirResource, HeldItem, Job, StoredResource
from tests.api.test_case_bundle import store_of
from tests.api.test_pull_end_to_end import pull_job
from tests.conftest import FHIR_JSON, FIXTURES, SYNTHEA, Tokens, load_fixture, partner_sandbox
from tests.integration.imaging.cases import make_case, study_ref

CT2 = sorted((FIXTURES / "dicom" / "series_77654033_CT2").glob("*.dcm"))  # Doe^Archibald
MR1 = sorted((FIXTURES / "dicom" / "series_98892003_MR1").glob("*.dcm"))  # Doe^Peter
ISSUER = "1.2.826.0.1.3680043.9.7433"  # the PACS's patient-id issuer, per the partners file


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@dataclass
class ImagingWorld:
    client: TestClient
    store: Store
    settings: Settings
    case_id: str
    partner: Partner
    admin: dict[str, str]

    def pull(self) -> None:
        pull_for_partner(self.settings, self.store, self.case_id, self.partner)
        normalise.normalise_case(self.store, self.settings, self.case_id)

    def studies(self) -> set[str]:
        resp = self.client.get(f"/cases/{self.case_id}/dicom-web/studies", headers=self.admin)
        assert resp.status_code == 200, resp.text
        return {s["0020000D"]["Value"][0] for s in resp.json()}

    def bundle_studies(self) -> set[str]:
        resp = self.client.get(f"/cases/{self.case_id}/bundle", headers=self.admin)
        assert resp.status_code == 200, resp.text
        return {
            i["value"].removeprefix("urn:oid:")
            for e in resp.json()["entry"]
            if e["resource"]["resourceType"] == "ImagingStudy"
            for i in e["resource"]["identifier"]
            if i.get("system") == "urn:dicom:uid"
        }

    def timeline_imaging(self) -> set[str]:
        """The imaging events of GET /cases/{id}/timeline, checked against the bundle's
        ImagingStudy resources (the stored case view is of the same build)."""
        resp = self.client.get(f"/cases/{self.case_id}/timeline", headers=self.admin)
        assert resp.status_code == 200, resp.text
        events = {e["resource"] for e in resp.json()["events"] if e["kind"] == "imaging"}
        bundle = self.client.get(f"/cases/{self.case_id}/bundle", headers=self.admin).json()
        assert events == {
            f"ImagingStudy/{e['resource']['id']}"
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "ImagingStudy"
        }
        return events

    def identity(self) -> dict[str, Any]:
        resp = self.client.get(f"/cases/{self.case_id}", headers=self.admin)
        assert resp.status_code == 200, resp.text
        out: dict[str, Any] = resp.json()["identity"]
        return out


@pytest.fixture
def imaging(client: TestClient, tokens: Tokens, settings: Settings, tmp_path: Path):
    folder = tmp_path / "pacs"
    folder.mkdir()
    for p in [*CT2, *MR1]:
        shutil.copy(p, folder / f"{p.parent.name}-{p.name}")
    store = store_of(client)
    ct = pydicom.dcmread(CT2[0], stop_before_pixels=True)
    case_id = make_case(
        store,
        "case-img",
        patient_identifiers=[{"system": f"urn:oid:{ISSUER}", "value": str(ct.PatientID)}],
        patient={"name": [{"family": "Doe", "given": ["Archibald"]}]},
        supporting_info=[study_ref(uid(CT2[0])), study_ref(uid(MR1[0]))],
    )
    with PacsServer(folder) as pacs:
        endpoint = DicomwebEndpoint(
            base_url=pacs.base_url, search_by_patient=False, issuer_of_patient_id=ISSUER
        )
        partner = Partner(
            id="st-elsewhere",
            name="St Elsewhere",
            identifier=PartnerIdentifier(system="urn:x", value="y"),
            dicomweb=endpoint,
        )
        world = ImagingWorld(
            client, store, settings, case_id, partner, tokens.headers("admin", sub="op")
        )
        world.pull()
        yield world


def audit_actions(store: Store, case_id: str) -> list[tuple[str, str, list[str]]]:
    with store.session() as s:
        rows = s.scalars(select(AuditRow).where(AuditRow.case_id == case_id).order_by(AuditRow.id))
        return [
            (r.action, r.agent, list(r.entity)) for r in rows if r.action.startswith("identity")
        ]


def test_foreign_study_is_held_then_released_into_qido_and_bundle(
    imaging: ImagingWorld, tokens: Tokens
) -> None:
    w = imaging
    ct, mr = uid(CT2[0]), uid(MR1[0])
    # Held: the referral named the MR study, but it is Doe^Peter's (other id, same issuer).
    assert w.studies() == {ct}
    assert w.bundle_studies() == {ct}
    assert len(w.timeline_imaging()) == 1
    wado = w.client.get(f"/cases/{w.case_id}/dicom-web/studies/{mr}/metadata", headers=w.admin)
    assert wado.status_code == 404
    identity = w.identity()
    assert identity["held"] == 1
    (item,) = identity["items"]
    assert (item["kind"], item["what"], item["outcome"]) == (
        "study",
        f"ImagingStudy urn:oid:{mr}",
        "mismatch",
    )
    assert item["differ"] == ["identifier", "name"]
    shown = json.dumps(identity)
    for value in ("Peter", "Doe", "98890234", "77654033"):
        assert value not in shown  # field names only, never the compared values
    summary = w.client.get(f"/cases/{w.case_id}/summary", headers=w.admin).json()
    assert summary["identity"]["items"][0]["differ"] == ["identifier", "name"]
    listed = w.client.get("/admin/held", headers=w.admin).json()
    assert [i["id"] for i in listed] == [item["id"]]

    # A reviewer may not decide; an admin releases (audited) and normalisation is queued.
    url = f"/cases/{w.case_id}/held/{item['id']}/$release"
    reviewer = tokens.headers("reviewer", sub="rev-1")
    assert w.client.post(url, headers=reviewer).status_code == 403
    resp = w.client.post(url, headers=w.admin)
    assert resp.status_code == 200, resp.text
    assert (resp.json()["state"], resp.json()["decidedBy"]) == ("released", "op")
    again = w.client.post(url, headers=w.admin)
    assert again.status_code == 409
    assert again.json()["resourceType"] == "OperationOutcome"
    assert w.studies() == {ct, mr}  # the per-case DICOMweb shows it at once
    with w.store.session() as s:
        queued = s.scalars(
            select(Job).where(Job.case_id == w.case_id, Job.kind == normalise.KIND)
        ).all()
    assert len(queued) == 1
    job_handlers.register_all()
    assert jobs.Worker(w.store, w.settings).run_once()
    assert w.bundle_studies() == {ct, mr}
    assert len(w.timeline_imaging()) == 2  # the re-normalisation refreshed the case view
    actions = audit_actions(w.store, w.case_id)
    assert [(a, who) for a, who, _ in actions] == [
        ("identity.hold", "fhir-gateway"),
        ("identity.release", "op"),
    ]
    assert "identity:mismatch:identifier,name" in actions[0][2]


def test_held_study_named_by_an_imagingstudy_in_the_referral_stays_out(
    imaging: ImagingWorld,
) -> None:
    """The referral's own ImagingStudy entry for a held study is kept out of the bundle too."""
    w = imaging
    ct, mr = uid(CT2[0]), uid(MR1[0])
    with w.store.session() as s:
        s.add(
            FhirResource(
                resource_type="ImagingStudy",
                id="referral-mr",
                case_id=w.case_id,
                body={
                    "resourceType": "ImagingStudy",
                    "id": "referral-mr",
                    "status": "available",
                    "subject": {"reference": f"Patient/pat-{w.case_id}"},
                    "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{mr}"}],
                },
            )
        )
    normalise.normalise_case(w.store, w.settings, w.case_id)
    assert w.bundle_studies() == {ct}
    (item,) = w.identity()["items"]
    resp = w.client.post(f"/cases/{w.case_id}/held/{item['id']}/$release", headers=w.admin)
    assert resp.status_code == 200, resp.text
    normalise.normalise_case(w.store, w.settings, w.case_id)
    assert w.bundle_studies() == {ct, mr}


def test_rejected_study_stays_out_after_a_re_pull(imaging: ImagingWorld) -> None:
    w = imaging
    (item,) = w.identity()["items"]
    url = f"/cases/{w.case_id}/held/{item['id']}/$reject"
    assert w.client.post(url, headers=w.admin).json()["state"] == "rejected"
    w.pull()  # the partner's data is unchanged: the decision stands, nothing new is held
    assert w.studies() == {uid(CT2[0])}
    assert w.bundle_studies() == {uid(CT2[0])}
    assert len(w.timeline_imaging()) == 1
    assert w.identity()["held"] == 0
    assert w.client.get("/admin/held?state=rejected", headers=w.admin).json()[0]["id"] == item["id"]
    release = f"/cases/{w.case_id}/held/{item['id']}/$release"
    assert w.client.post(release, headers=w.admin).status_code == 409


def test_unknown_state_filter_is_a_400_naming_the_parameter(client, tokens) -> None:
    resp = client.get("/admin/held?state=whatever", headers=tokens.headers("admin"))
    assert resp.status_code == 400
    assert resp.json()["issue"][0]["expression"] == ["query.state"]
    assert "whatever" not in resp.text


def test_normalise_kind_constant_is_the_job_kind() -> None:
    assert held.NORMALISE_KIND == normalise.KIND


# --- FHIR records ----------------------------------------------------------------------------


@pytest.fixture
def ehr_both(settings: Settings) -> Iterator[SandboxServer]:
    """The partner's EHR holding both Synthea patients (Lourdes Alcántar and Darin Skiles)."""
    server = partner_sandbox(settings, SYNTHEA)
    partners = settings.data_dir / "partners.toml"
    text = partners.read_text().replace(
        'base_url = "http://127.0.0.1:8181/fhir"', f'base_url = "{server.base_url}"', 1
    )
    partners.write_text(text)
    yield server
    server.stop()


DARIN_MRN = "31c343e9-5d7f-444e-9be4-56b1a6ec6146"


def test_records_of_another_patient_are_held_until_released(
    ehr_both: SandboxServer, client: TestClient, tokens: Tokens, settings: Settings
) -> None:
    """The referral is Lourdes Alcántar's, but its MRN was mis-keyed as Darin Skiles's: the EHR
    answers with his record. It is held (name, birth date and sex differ), not merged."""
    bundle: dict[str, Any] = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
    patient = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["resource"]["identifier"] = [
        {"system": "http://hospital.smarthealthit.org", "value": DARIN_MRN}
    ]
    resp = client.post("/fhir", json=bundle, headers=tokens.headers("ehr") | FHIR_JSON)
    assert resp.status_code == 200, resp.text
    admin = tokens.headers("admin", sub="op")
    case_id = str(client.get("/cases", headers=admin).json()[0]["id"])
    store = store_of(client)
    job_handlers.register_all()
    assert jobs.Worker(store, settings).run_once()
    assert pull_job(client, tokens, case_id)["state"] == "done"
    with store.session() as s:
        (darin,) = s.scalars(
            select(StoredResource.source_id).where(
                StoredResource.case_id == case_id, StoredResource.resource_type == "Patient"
            )
        ).all()
    normalise.normalise_case(store, settings, case_id)

    identity = client.get(f"/cases/{case_id}", headers=admin).json()["identity"]
    (item,) = identity["items"]
    assert (item["kind"], item["what"], item["state"]) == ("patient", f"Patient/{darin}", "held")
    assert (item["outcome"], item["differ"]) == ("mismatch", ["name", "birthDate", "sex"])
    # His whole birth date, not the year alone: "1967" also turns up inside random ids.
    for value in ("Skiles", "Darin", "1967-01-21", "Alc"):
        assert value not in json.dumps(identity)
    types = bundle_types(client, case_id, admin)
    assert types.get("Observation", 0) == 0  # none of his records in her case
    assert types["Patient"] == 1  # the referral's

    resp = client.post(f"/cases/{case_id}/held/{item['id']}/$release", headers=admin)
    assert resp.status_code == 200, resp.text
    normalise.normalise_case(store, settings, case_id)
    assert bundle_types(client, case_id, admin)["Observation"] > 0


def bundle_types(client: TestClient, case_id: str, headers: dict[str, str]) -> dict[str, int]:
    resp = client.get(f"/cases/{case_id}/bundle", headers=headers)
    assert resp.status_code == 200, resp.text
    counts: dict[str, int] = {}
    for e in resp.json()["entry"]:
        t = e["resource"]["resourceType"]
        counts[t] = counts.get(t, 0) + 1
    return counts


def test_a_record_about_a_patient_not_asked_for_is_held(store: Store, settings: Settings) -> None:
    """A pulled Observation whose subject is a Patient the partner was not asked for (and whose
    Patient did not come along) is held with that Patient's records; the rest stays."""
    case_id = make_case(
        store,
        "case-rec",
        patient={"name": [{"family": "Alcántar", "given": ["Lourdes"]}], "birthDate": "1940-05-08"},
        patient_identifiers=[{"system": "urn:mrn", "value": "L1"}],
    )
    source = "https://ehr.example/fhir"
    rows: list[tuple[str, str, dict[str, Any]]] = [
        ("Patient", "p1", {"identifier": [{"system": "urn:mrn", "value": "L1"}]}),
        ("Observation", "o1", {"subject": {"reference": "Patient/p1"}}),
        ("Observation", "o2", {"subject": {"reference": f"{source}/Patient/p2"}}),
    ]
    with store.session() as s:
        for rtype, rid, body in rows:
            s.add(
                StoredResource(
                    case_id=case_id,
                    source=source,
                    resource_type=rtype,
                    source_id=rid,
                    body={"resourceType": rtype, "id": rid, **body},
                )
            )
    assert held.check_records(store, case_id, source, "p1") == 1
    with store.session() as s:
        (item,) = s.scalars(select(HeldItem)).all()
        assert (item.key, item.outcome, item.fields["differ"]) == (
            "Patient/p2",
            "mismatch",
            ["reference"],
        )
        out = held.excluded(s, case_id)
        kept = [
            r.source_id
            for r in s.scalars(select(StoredResource).where(StoredResource.case_id == case_id))
            if out.keeps(r)
        ]
    assert sorted(kept) == ["o1", "p1"]
    # Checking again changes nothing (idempotent) and writes no second hold.
    assert held.check_records(store, case_id, source, "p1") == 1
    assert [a for a, _, _ in audit_actions(store, case_id)] == ["identity.hold"]
