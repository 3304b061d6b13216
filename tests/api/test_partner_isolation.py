"""Right partner: a referral references only its own partner's resources, entries of the same
push, or contained ones (DESIGN "Right patient, right partner"; RS-30).

A two-partner matrix over every reference-bearing element intake accepts: partner A
(st-elsewhere) pointing at a resource partner B (mercy-north) pushed -> 422 naming the element
(FHIRPath), nothing stored; the same element pointing at A's own resource -> accepted. Before, A's
`ServiceRequest.subject = Patient/<B's patient>` was accepted and the pull fetched B's patient.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fhir_gateway.store.models import Case, FhirResource
from tests.conftest import FHIR_JSON, Tokens, load_fixture

A, B = "st-elsewhere", "mercy-north"
A_BASE = "http://127.0.0.1:8181/fhir"  # st-elsewhere's registered FHIR base (partners.toml)
B_BASE = "https://ehr.mercy-north.example/fhir/R4"
OUR_BASE = "http://127.0.0.1:8080/fhir"  # Settings.public_base_url default
PATIENT_URN = "urn:uuid:7d2b9a53-0c41-4f6e-9d0e-1a2b3c4d5e01"
CODE = {"coding": [{"system": "http://loinc.org", "code": "11526-1"}]}
_serial = iter(range(10_000))


def referral(partner: str) -> dict[str, Any]:
    """The fixture referral for `partner`, with identifiers no earlier push used."""
    tag = f"{partner}-{next(_serial)}"
    bundle: dict[str, Any] = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
    for entry in bundle["entry"]:
        entry["request"].pop("ifNoneExist", None)
        res = entry["resource"]
        if res["resourceType"] == "Organization":
            res["identifier"][0]["value"] = partner
        else:
            for ident in res["identifier"]:
                ident["value"] = f"{ident['value']}-{tag}"
    return bundle


def extra(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}


def others(patient: str) -> dict[str, dict[str, Any]]:
    """One minimal valid resource of each other hosted type, about `patient`."""
    doc = {"contentType": "text/plain", "data": base64.b64encode(b"synthetic").decode()}
    return {
        "Practitioner": {"resourceType": "Practitioner", "name": [{"family": "Synthetic"}]},
        "PractitionerRole": {"resourceType": "PractitionerRole", "active": True},
        "DocumentReference": {
            "resourceType": "DocumentReference",
            "status": "current",
            "content": [{"attachment": doc}],
        },
        "ImagingStudy": {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": {"reference": patient},
        },
        "Condition": {"resourceType": "Condition", "subject": {"reference": patient}},
        "DiagnosticReport": {"resourceType": "DiagnosticReport", "status": "final", "code": CODE},
        "Observation": {"resourceType": "Observation", "status": "final", "code": CODE},
    }


def seed(client: TestClient, tokens: Tokens, partner: str) -> dict[str, str]:
    """Push a referral and one resource of every other hosted type as `partner`: type -> id."""
    headers = tokens.headers("ehr", partner=partner) | FHIR_JSON
    resp = client.post("/fhir", json=referral(partner), headers=headers)
    assert resp.status_code == 200, resp.text
    ids = {
        loc.split("/")[0]: loc.split("/")[1]
        for loc in (e["response"]["location"] for e in resp.json()["entry"])
    }
    for rtype, body in others(f"Patient/{ids['Patient']}").items():
        made = client.post(f"/fhir/{rtype}", json=body, headers=headers)
        assert made.status_code == 201, made.text
        ids[rtype] = made.json()["id"]
    # a ServiceRequest of its own that no Task has claimed yet (for Task.focus)
    sr = copy.deepcopy(referral(partner)["entry"][2]["resource"])
    sr["subject"] = {"reference": f"Patient/{ids['Patient']}"}
    sr["requester"] = {
        "identifier": {"system": "urn:oid:2.16.840.1.113883.3.9999", "value": partner}
    }
    made = client.post("/fhir/ServiceRequest", json=sr, headers=headers)
    assert made.status_code == 201, made.text
    ids["free-ServiceRequest"] = made.json()["id"]
    return ids


Mutate = Callable[[dict[str, Any], dict[str, Any]], str]  # (bundle, Reference) -> FHIRPath


def on(index: int, element: str, *, many: bool = False, **wrap: Any) -> Mutate:
    """Set `element` of entry `index` to the Reference (as a list when `many`); `wrap` nests it
    (e.g. input with a type and valueReference)."""

    def mutate(bundle: dict[str, Any], ref: dict[str, Any]) -> str:
        res = bundle["entry"][index]["resource"]
        value: Any = ref
        path = f"Bundle.entry[{index}].resource.{element}"
        if wrap:
            ((key, extra_fields),) = wrap.items()
            value = {**extra_fields, key: ref}
            path += f"[0].{key}" if many else f".{key}"
        elif many:
            path += "[0]"
        res[element] = [value] if many else value
        return path

    return mutate


def new_entry(rtype: str, element: str, *, many: bool = False) -> Mutate:
    """Append an entry of `rtype` whose `element` holds the Reference."""

    def mutate(bundle: dict[str, Any], ref: dict[str, Any]) -> str:
        res = copy.deepcopy(others(PATIENT_URN)[rtype])
        res[element] = [ref] if many else ref
        bundle["entry"].append(extra(res))
        return f"Bundle.entry[{len(bundle['entry']) - 1}].resource.{element}" + (
            "[0]" if many else ""
        )

    return mutate


def nested(rtype: str, outer: str, inner: str) -> Mutate:
    def mutate(bundle: dict[str, Any], ref: dict[str, Any]) -> str:
        res = copy.deepcopy(others(PATIENT_URN)[rtype])
        res[outer] = {inner: [ref]}
        bundle["entry"].append(extra(res))
        return f"Bundle.entry[{len(bundle['entry']) - 1}].resource.{outer}.{inner}[0]"

    return mutate


def contained_subject(bundle: dict[str, Any], ref: dict[str, Any]) -> str:
    sr = bundle["entry"][2]["resource"]
    sr["contained"] = [{**others(PATIENT_URN)["Observation"], "id": "o1", "subject": ref}]
    sr["supportingInfo"] = [{"reference": "#o1"}]
    return "Bundle.entry[2].resource.contained[0].subject"


def extension_reference(bundle: dict[str, Any], ref: dict[str, Any]) -> str:
    task = bundle["entry"][3]["resource"]
    task["extension"] = [{"url": "urn:test:extension", "valueReference": ref}]
    return "Bundle.entry[3].resource.extension[0].valueReference"


TASK_INPUT = {"type": {"text": "supporting document"}}
PATIENT_LINK = {"type": "seealso"}

# (element, the type of resource it points at, how to set it)
MATRIX: list[tuple[str, str, Mutate]] = [
    ("Task.for", "Patient", on(3, "for")),
    ("Task.focus", "free-ServiceRequest", on(3, "focus")),
    ("Task.basedOn", "ServiceRequest", on(3, "basedOn", many=True)),
    ("Task.partOf", "Task", on(3, "partOf", many=True)),
    ("Task.owner", "Organization", on(3, "owner")),
    ("Task.reasonReference", "Condition", on(3, "reasonReference")),
    (
        "Task.input.valueReference",
        "DocumentReference",
        on(3, "input", many=True, valueReference=TASK_INPUT),
    ),
    ("Task.extension.valueReference", "Patient", extension_reference),
    ("ServiceRequest.subject", "Patient", on(2, "subject")),
    (
        "ServiceRequest.supportingInfo (ImagingStudy)",
        "ImagingStudy",
        on(2, "supportingInfo", many=True),
    ),
    (
        "ServiceRequest.supportingInfo (DocumentReference)",
        "DocumentReference",
        on(2, "supportingInfo", many=True),
    ),
    (
        "ServiceRequest.supportingInfo (DiagnosticReport)",
        "DiagnosticReport",
        on(2, "supportingInfo", many=True),
    ),
    ("ServiceRequest.reasonReference", "Condition", on(2, "reasonReference", many=True)),
    ("ServiceRequest.basedOn", "ServiceRequest", on(2, "basedOn", many=True)),
    ("ServiceRequest.replaces", "ServiceRequest", on(2, "replaces", many=True)),
    ("ServiceRequest.performer", "Practitioner", on(2, "performer", many=True)),
    ("ServiceRequest.contained.subject", "Patient", contained_subject),
    ("Patient.managingOrganization", "Organization", on(1, "managingOrganization")),
    ("Patient.generalPractitioner", "Practitioner", on(1, "generalPractitioner", many=True)),
    ("Patient.link.other", "Patient", on(1, "link", many=True, other=PATIENT_LINK)),
    ("Organization.partOf", "Organization", on(0, "partOf")),
    ("Observation.subject", "Patient", new_entry("Observation", "subject")),
    ("Observation.hasMember", "Observation", new_entry("Observation", "hasMember", many=True)),
    ("Condition.subject", "Patient", new_entry("Condition", "subject")),
    ("DocumentReference.subject", "Patient", new_entry("DocumentReference", "subject")),
    (
        "DocumentReference.context.related",
        "DiagnosticReport",
        nested("DocumentReference", "context", "related"),
    ),
    ("ImagingStudy.subject", "Patient", new_entry("ImagingStudy", "subject")),
    ("ImagingStudy.referrer", "Practitioner", new_entry("ImagingStudy", "referrer")),
    ("DiagnosticReport.subject", "Patient", new_entry("DiagnosticReport", "subject")),
    ("DiagnosticReport.result", "Observation", new_entry("DiagnosticReport", "result", many=True)),
    (
        "PractitionerRole.practitioner",
        "Practitioner",
        new_entry("PractitionerRole", "practitioner"),
    ),
    (
        "PractitionerRole.organization",
        "Organization",
        new_entry("PractitionerRole", "organization"),
    ),
]


def stored(client: TestClient) -> tuple[int, int]:
    with client.app.state.store.session(readonly=True) as s:  # type: ignore[attr-defined]
        return (
            s.scalar(select(func.count()).select_from(FhirResource)) or 0,
            s.scalar(select(func.count()).select_from(Case)) or 0,
        )


@pytest.fixture
def seeded(client: TestClient, tokens: Tokens) -> dict[str, dict[str, str]]:
    return {A: seed(client, tokens, A), B: seed(client, tokens, B)}


def push_as_a(client: TestClient, tokens: Tokens, bundle: dict[str, Any]) -> Any:
    return client.post("/fhir", json=bundle, headers=tokens.headers("ehr", partner=A) | FHIR_JSON)


@pytest.mark.parametrize(("element", "target", "mutate"), MATRIX, ids=[m[0] for m in MATRIX])
def test_reference_to_another_partners_resource_is_422(
    client, tokens, seeded, element, target, mutate
) -> None:
    before = stored(client)
    bundle = referral(A)
    ref = {"reference": f"{target.removeprefix('free-')}/{seeded[B][target]}"}
    path = mutate(bundle, ref)
    resp = push_as_a(client, tokens, bundle)
    assert resp.status_code == 422, resp.text
    issue = resp.json()["issue"][0]
    assert issue["expression"] == [path]
    assert seeded[B][target] not in resp.text  # the other partner's id is not echoed
    assert stored(client) == before  # nothing stored


@pytest.mark.parametrize(("element", "target", "mutate"), MATRIX, ids=[m[0] for m in MATRIX])
def test_reference_to_own_resource_is_accepted(
    client, tokens, seeded, element, target, mutate
) -> None:
    before = stored(client)
    bundle = referral(A)
    ref = {"reference": f"{target.removeprefix('free-')}/{seeded[A][target]}"}
    mutate(bundle, ref)
    resp = push_as_a(client, tokens, bundle)
    assert resp.status_code == 200, resp.text
    assert stored(client)[1] == before[1] + 1  # a new case


@pytest.mark.parametrize(
    ("reference", "status"),
    [
        (f"{B_BASE}/ImagingStudy/1", 422),  # B's own EHR
        ("https://elsewhere.example/fhir/ImagingStudy/1", 422),  # nobody's registered system
        (f"{OUR_BASE}/ImagingStudy/{{b}}", 422),  # B's resource here, by absolute URL
        ("urn:uuid:00000000-0000-4000-8000-0000000000ff", 422),  # not an entry of the push
        ("ImagingStudy/does-not-exist", 422),
        ("Specimen/1", 422),  # a type we do not host cannot be here
        ("#missing", 422),
        (f"{A_BASE}/ImagingStudy/1", 200),  # A's own EHR
        (f"{OUR_BASE}/ImagingStudy/{{a}}", 200),  # A's resource here, by absolute URL
    ],
)
def test_absolute_and_unresolvable_references(client, tokens, seeded, reference, status) -> None:
    before = stored(client)
    bundle = referral(A)
    ref = {"reference": reference.format(a=seeded[A]["ImagingStudy"], b=seeded[B]["ImagingStudy"])}
    path = on(2, "supportingInfo", many=True)(bundle, ref)
    resp = push_as_a(client, tokens, bundle)
    assert resp.status_code == status, resp.text
    if status == 422:
        assert resp.json()["issue"][0]["expression"] == [path]
        assert stored(client) == before


def test_contained_specimen_is_accepted(client, tokens) -> None:
    bundle = referral(A)
    sr = bundle["entry"][2]["resource"]
    sr["contained"] = [{"resourceType": "Specimen", "id": "s1"}]
    sr["specimen"] = [{"reference": "#s1"}]
    assert push_as_a(client, tokens, bundle).status_code == 200


def test_requester_naming_another_partner_is_refused(client, tokens, seeded) -> None:
    before = stored(client)
    for index in (2, 3):
        bundle = referral(A)
        bundle["entry"][index]["resource"]["requester"] = {
            "reference": f"Organization/{seeded[B]['Organization']}"
        }
        resp = push_as_a(client, tokens, bundle)
        assert resp.status_code == 422, resp.text
        assert resp.json()["issue"][0]["expression"] == [
            f"Bundle.entry[{index}].resource.requester"
        ]
    assert stored(client) == before


def test_single_post_referencing_another_partner_is_422(client, tokens, seeded) -> None:
    before = stored(client)
    obs = {
        **others(PATIENT_URN)["Observation"],
        "subject": {"reference": f"Patient/{seeded[B]['Patient']}"},
    }
    headers = tokens.headers("ehr", partner=A) | FHIR_JSON
    resp = client.post("/fhir/Observation", json=obs, headers=headers)
    assert resp.status_code == 422
    assert resp.json()["issue"][0]["expression"] == ["Observation.subject"]
    assert stored(client) == before
    obs["subject"] = {"reference": f"Patient/{seeded[A]['Patient']}"}
    assert client.post("/fhir/Observation", json=obs, headers=headers).status_code == 201
