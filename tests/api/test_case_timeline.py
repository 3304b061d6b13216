"""The case a specialist needs, on the Synthea colon-cancer patient (Darin Skiles) pulled from the
sandbox EHR: the primary cancer condition claimed, CEA as TumorMarkerTests in one unit, the
consult question and specimens in /summary, the colorectal completeness list, and
GET /cases/{id}/timeline in date order (audited like the bundle read)."""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fhir_gateway.casebundle.timeline import sort_key
from fhir_gateway.sandbox import SandboxServer
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import AuditRow
from tests.api.test_case_bundle import run_jobs, store_of
from tests.conftest import FIXTURES, Tokens, load_fixture, partner_sandbox
from tests.report_helpers import draft_data

MCODE = "http://hl7.org/fhir/us/mcode/StructureDefinition/"
PQ_TRANSLATION = "http://hl7.org/fhir/StructureDefinition/iso21090-PQ-translation"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def colon_ehr(settings: Settings, tmp_path: Path) -> Iterator[SandboxServer]:
    """The sandbox EHR with the Synthea colon patient and the authored oncology supplement
    (CEA in ng/mL and ug/L, a resection specimen with block and slide, a pathology document,
    a pathologic stage group); the partner has no PACS, so the case has one pull."""
    data = tmp_path / "ehr"
    data.mkdir()
    shutil.copy(FIXTURES / "synthea" / "colon_Darin_Skiles.json", data)
    shutil.copy(FIXTURES / "oncology" / "colon_Darin_Skiles_oncology.json", data)
    server = partner_sandbox(settings, data, max_page_size=50)
    partners = settings.data_dir / "partners.toml"
    text = partners.read_text().replace(
        'base_url = "http://127.0.0.1:8181/fhir"', f'base_url = "{server.base_url}"', 1
    )
    text = re.sub(r"\[partners\.dicomweb\].*?\n\n", "", text, count=1, flags=re.S)
    partners.write_text(text)
    yield server
    server.stop()


@pytest.fixture
def colon_case(colon_ehr: SandboxServer, client: TestClient, tokens: Tokens, settings) -> str:
    bundle = load_fixture("referrals/referral-darin-skiles.json")
    resp = client.post("/fhir", json=bundle, headers=tokens.headers("ehr") | FHIR_JSON)
    assert resp.status_code == 200, resp.text
    case_id = str(client.get("/cases", headers=tokens.headers("admin")).json()[0]["id"])
    run_jobs(store_of(client), settings)
    return case_id


def _bundle(client: TestClient, case_id: str, tokens: Tokens) -> list[dict[str, Any]]:
    resp = client.get(f"/cases/{case_id}/bundle", headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text
    return [e["resource"] for e in resp.json()["entry"]]


def test_primary_cancer_and_cea_in_one_unit(
    colon_case: str, client: TestClient, tokens: Tokens
) -> None:
    resources = _bundle(client, colon_case, tokens)
    primary = [
        r
        for r in resources
        if MCODE + "mcode-primary-cancer-condition" in r.get("meta", {}).get("profile", [])
    ]
    assert [p["code"]["coding"][0]["code"] for p in primary] == ["93761005"]
    cea = [
        r
        for r in resources
        if r["resourceType"] == "Observation"
        and any(c.get("code") == "2039-6" for c in r["code"].get("coding", []))
    ]
    assert len(cea) == 3
    assert all(MCODE + "mcode-tumor-marker-test" in r["meta"]["profile"] for r in cea)
    assert {r["valueQuantity"]["code"] for r in cea} == {"ng/mL"}
    converted = [r for r in cea if r["valueQuantity"].get("extension")]
    assert len(converted) == 1
    original = converted[0]["valueQuantity"]["extension"][0]
    assert original["url"] == PQ_TRANSLATION
    assert original["valueQuantity"]["code"] == "ug/L"
    assert converted[0]["valueQuantity"]["value"] == pytest.approx(4.1)
    stage = [
        r
        for r in resources
        if MCODE + "mcode-tnm-stage-group" in r.get("meta", {}).get("profile", [])
    ]
    assert [s["focus"][0]["reference"] for s in stage] == [f"Condition/{primary[0]['id']}"]


def test_summary_question_specimens_and_colorectal_completeness(
    colon_case: str, client: TestClient, tokens: Tokens
) -> None:
    resp = client.get(f"/cases/{colon_case}/summary", headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text
    summary = resp.json()
    question = summary["question"]
    assert question["serviceRequest"].startswith("ServiceRequest/")
    assert question["code"] == "Oncology second opinion"
    assert [r["coding"][0]["code"] for r in question["reasons"]] == ["93761005"]
    assert "adjuvant chemotherapy" in question["notes"][0]
    [specimen] = summary["specimens"]
    assert specimen["accession"]["value"] == "S17-0412"
    kinds = {c["kind"]: [i["value"] for i in c["identifiers"]] for c in specimen["containers"]}
    assert kinds == {"block": ["S17-0412-A1"], "slide": ["S17-0412-A1-1"]}

    completeness = summary["completeness"]
    assert [c["type"] for c in completeness["cancer"]] == ["colorectal"]
    checklist = {c["key"]: c for c in completeness["checklist"]}
    assert list(checklist) == [
        "primary_cancer_condition",
        "pathology_report",
        "staging",
        "tumour_markers",
        "imaging",
        "cea",
        "msi_mmr",
        "kras_nras_braf",
    ]
    present = {k for k, c in checklist.items() if c["present"]}
    assert present == {"primary_cancer_condition", "pathology_report", "staging"} | {
        "tumour_markers",
        "cea",
    }
    assert checklist["cea"]["count"] == 3
    assert all(r.startswith("Observation/") for r in checklist["cea"]["resources"])
    assert checklist["pathology_report"]["resources"][0].startswith("DocumentReference/")
    assert completeness["missing"] == ["imaging", "msi_mmr", "kras_nras_braf"]
    # the keys the summary always had still work
    assert completeness["primary_cancer_condition"]["present"] is True
    assert completeness["imaging"] == {"present": False, "count": 0, "resources": []}


def test_timeline_in_date_order(
    colon_case: str, client: TestClient, tokens: Tokens, settings: Settings
) -> None:
    resp = client.get(f"/cases/{colon_case}/timeline", headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    events = body["events"]
    assert body["count"] == len(events) > 20
    keys = [sort_key(e["date"]) for e in events]
    assert keys == sorted(keys)
    assert all(e["date"] for e in events)
    kinds = {e["kind"] for e in events}
    assert {"diagnosis", "procedure", "tumour-marker", "staging", "document"} <= kinds
    resources = {f"{r['resourceType']}/{r['id']}" for r in _bundle(client, colon_case, tokens)}
    assert {e["resource"] for e in events} <= resources
    cancer = [e for e in events if e.get("cancer")]
    assert [e["display"] for e in cancer] == ["Primary malignant neoplasm of colon"]
    markers = [e for e in events if e["kind"] == "tumour-marker"]
    assert [m["date"][:10] for m in markers] == ["2017-01-25", "2017-06-20", "2018-03-14"]
    assert [m["value"]["value"] for m in markers] == pytest.approx([8.2, 4.1, 2.3])
    assert {m["value"]["code"] for m in markers} == {"ng/mL"}
    assert [m.get("original", {}).get("code") for m in markers] == [None, "ug/L", None]
    # the diagnosis comes before the staging and the first marker after it, as in the record
    order = [e["resource"] for e in events]
    staging = next(e for e in events if e["kind"] == "staging")
    assert order.index(cancer[0]["resource"]) < order.index(staging["resource"])
    with store_of(client).session() as s:
        actions = [a for (a,) in s.execute(select(AuditRow.action))]
    assert "case.timeline" in actions


def test_timeline_needs_assignment_and_a_built_bundle(
    colon_case: str, client: TestClient, tokens: Tokens
) -> None:
    reviewer = tokens.headers("reviewer", sub="dr-who")
    assert client.get(f"/cases/{colon_case}/timeline", headers=reviewer).status_code == 403
    resp = client.post(
        f"/cases/{colon_case}/assignments",
        headers=tokens.headers("admin"),
        json={"reviewer": "dr-who"},
    )
    assert resp.status_code in (200, 201), resp.text
    assert client.get(f"/cases/{colon_case}/timeline", headers=reviewer).status_code == 200
    missing = client.get("/cases/no-such-case/timeline", headers=tokens.headers("admin"))
    assert missing.status_code == 404


def test_report_names_the_question_and_the_specimen(
    colon_case: str, colon_ehr: SandboxServer, client: TestClient, tokens: Tokens
) -> None:
    """The submitted DiagnosticReport points at the specimen on the EHR it came from (with its
    accession number) and carries the referrer's question in its text forms."""
    admin = tokens.headers("admin")
    resp = client.post(
        f"/cases/{colon_case}/assignments", headers=admin, json={"reviewer": "dr-who"}
    )
    assert resp.status_code in (200, 201), resp.text
    reviewer = tokens.headers("reviewer", sub="dr-who")
    draft = {
        **draft_data(),
        "findings": [
            {k: v for k, v in f.items() if k not in ("focus", "derived_from")}
            for f in draft_data()["findings"]
        ],
    }
    resp = client.put(f"/cases/{colon_case}/report", headers=reviewer, json=draft)
    assert resp.status_code == 200, resp.text
    resp = client.post(f"/cases/{colon_case}/report/$submit", headers=reviewer)
    assert resp.status_code == 202, resp.text
    report = client.get(f"/cases/{colon_case}/report", headers=reviewer).json()
    dr = report["diagnosticReport"]
    [specimen] = dr["specimen"]
    assert specimen["reference"] == f"{colon_ehr.base_url}/Specimen/demo-specimen-resection"
    assert specimen["identifier"] == {
        "system": "urn:oid:2.16.840.1.113883.3.9999.5",
        "value": "S17-0412",
    }
    assert "block S17-0412-A1" in specimen["display"]
    assert "slide S17-0412-A1-1" in specimen["display"]
    text = next(f for f in dr["presentedForm"] if f["contentType"].startswith("text/plain"))
    plain = base64.b64decode(text["data"]).decode()
    assert "Question from the referrer:" in plain
    assert "is adjuvant chemotherapy indicated?" in plain
    assert "accession S17-0412" in plain
