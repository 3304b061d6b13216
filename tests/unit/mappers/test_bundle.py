"""Case bundle assembly: one Patient, de-duplication with Provenance, conflicts, streaming."""

from __future__ import annotations

import copy
import json

from fhir_gateway.casebundle.assemble import SourceBatch, assemble_case_bundle, iter_bundle_json
from tests.unit.mappers._helpers import FIXTURES, RECEIVED, case_of, map_one


def test_same_document_from_two_sources_is_merged_with_both_provenances() -> None:
    path = FIXTURES / "fhir" / "colon_Darin_Skiles.json"
    resources, issues, kind = map_one(path)
    from mappers.detect import map_document

    other = map_document(path.read_bytes(), path.name, "hospital-b")
    case = assemble_case_bundle(
        "case-patient",
        [
            SourceBatch("hospital-a", resources, issues, kind, "a.json", RECEIVED),
            SourceBatch("hospital-b", other.resources, other.issues, kind, "b.json", RECEIVED),
        ],
    )
    bundle = case.as_dict()
    entries = [e["resource"] for e in bundle["entry"]]
    provenances = [r for r in entries if r["resourceType"] == "Provenance"]
    assert len(provenances) == 2
    assert [p["agent"][0]["who"]["display"] for p in provenances] == ["hospital-a", "hospital-b"]
    assert [p["agent"][1]["type"]["coding"][0]["code"] for p in provenances] == ["transmitter"] * 2
    # Clinical resources of hospital-b are duplicates: merged, and both Provenances target them.
    clinical = {"Observation", "Condition", "Procedure", "DiagnosticReport", "Encounter",
                "Immunization", "MedicationRequest", "Organization", "Practitioner"}  # fmt: skip
    merged = [r for r in entries if r["resourceType"] in clinical]
    assert len(merged) == len([r for r in resources if r["resourceType"] in clinical])
    both = {t["reference"] for t in provenances[0]["target"]} & {
        t["reference"] for t in provenances[1]["target"]
    }
    assert {f"{r['resourceType']}/{r['id']}" for r in merged} <= both
    assert sum(r["resourceType"] == "Patient" for r in entries) == 1


def test_conflicting_demographics_are_flagged_not_merged() -> None:
    resources, _issues, kind = map_one(FIXTURES / "hl7v2" / "ORU-R01-RMGEAD.hl7")
    twin = copy.deepcopy(resources)
    for r in twin:
        r["id"] = r["id"][:-1] + ("0" if r["id"][-1] != "0" else "1")
    patient = next(r for r in twin if r["resourceType"] == "Patient")
    patient["birthDate"] = "1901-01-01"
    case = assemble_case_bundle(
        "p1",
        [
            SourceBatch("lab-a", resources, [], kind, "a", RECEIVED),
            SourceBatch("lab-b", twin, [], kind, "b", RECEIVED),
        ],
    )
    conflicts = [i for i in case.issues if i["code"] == "conflict"]
    assert [i["expression"] for i in conflicts] == [["Patient.birthDate"]]
    assert "1901" not in json.dumps(case.issues)  # no PHI values in issues
    patient_out = case.as_dict()["entry"][0]["resource"]
    assert patient_out["id"] == "p1"
    assert patient_out["birthDate"] != "1901-01-01"


def test_completeness_summary_counts_what_the_reviewer_needs() -> None:
    case = case_of([FIXTURES / "fhir" / "ctms_breast_metastatic_patient_data.json"])
    primary = case.summary["primary_cancer_condition"]
    assert (primary["present"], primary["count"]) == (True, 1)
    assert primary["resources"][0].startswith("Condition/")
    assert case.summary["tumour_markers"]["present"] is True
    assert case.summary["staging"]["count"] == 2
    assert "pathology_report" in case.summary["missing"]


def test_streamed_json_is_the_bundle() -> None:
    case = case_of([FIXTURES / "hl7v2" / "LAB-ORU-1.hl7"])
    streamed = b"".join(iter_bundle_json(
        case.patient_id,
        ((r["resourceType"], r["id"], json.dumps(r)) for r in case.resources),
        chunk_size=100,
    ))  # fmt: skip
    assert json.loads(streamed) == case.as_dict()
    chunks = list(iter_bundle_json("x", [("Patient", "x", "{}")] * 50, chunk_size=100))
    assert len(chunks) > 1
