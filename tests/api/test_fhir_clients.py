"""FHIR client libraries work against /fhir unmodified, as a referring EHR uses them (RS-01,
RS-20, RS-21): PyPI `fhirpy` 2.x (`SyncFHIRClient`) and SMART on FHIR's `fhirclient` 4.x, over
real HTTP on loopback with a dev-issuer `ehr` token. Plus the search parameters they rely on
(`_count`, `_id`, `_summary=count`, `_format`, `Bundle.total`) and POST to `/fhir/`."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from fhirclient import client as smart_client
from fhirclient.models.codeableconcept import CodeableConcept
from fhirclient.models.patient import Patient
from fhirclient.models.task import Task
from fhirpy import SyncFHIRClient

from fhir_gateway.app import create_app
from fhir_gateway.sandbox.server import AppServer, free_port
from fhir_gateway.settings import Settings
from tests.conftest import Tokens, load_fixture

TASK_IDENTIFIER = "urn:oid:2.16.840.1.113883.3.9999.2|TASK-2026-0001"
REASON = "Patient chose another centre"


@dataclass
class Gateway:
    base: str  # .../fhir
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def gateway(settings: Settings, tokens: Tokens) -> Iterator[Gateway]:
    port = free_port()
    # next links are absolute: fhirpy follows only those under the URL it was given
    public = settings.model_copy(update={"public_base_url": f"http://127.0.0.1:{port}"})
    with AppServer(create_app(public, configure_logs=False), port, lifespan=True) as server:
        token = tokens.headers("ehr")["Authorization"].split(" ", 1)[1]
        yield Gateway(f"{server.url}/fhir", token)


def referral() -> dict[str, Any]:
    bundle: dict[str, Any] = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
    return bundle


def task_id_of(response: dict[str, Any]) -> str:
    return str(response["entry"][3]["response"]["location"].split("/")[1])


def test_fhirpy_as_a_referring_ehr(gateway: Gateway) -> None:
    client = SyncFHIRClient(gateway.base, authorization=f"Bearer {gateway.token}")
    metadata = client.execute("metadata", method="get")
    assert metadata["fhirVersion"] == "4.0.1"

    pushed = client.execute("/", method="post", data=referral())  # POST /fhir/
    assert pushed["type"] == "transaction-response"
    task_id = task_id_of(pushed)

    tasks = client.resources("Task").search(identifier=TASK_IDENTIFIER)
    assert tasks.count() == 1  # _count=0 (+ _totalMethod): Bundle.total
    first = tasks.first()  # _count=1
    assert first is not None
    assert (first.id, first["status"]) == (task_id, "received")
    assert client.resources("Task").search(_id=task_id).get().id == task_id
    assert client.resources("Task").search(_id="no-such-task").first() is None
    assert client.resources("Task").search(_id="no-such-task").count() == 0

    task = client.reference("Task", task_id).to_resource()  # read
    task["status"] = "cancelled"
    task["statusReason"] = {"text": REASON}
    task.save()  # PUT /fhir/Task/{id}
    again = client.reference("Task", task_id).to_resource()
    assert again["status"] == "cancelled"
    assert again["statusReason"]["text"] == REASON


def test_fhirpy_follows_next_links(gateway: Gateway) -> None:
    client = SyncFHIRClient(gateway.base, authorization=f"Bearer {gateway.token}")
    ids = []
    for n in range(3):
        patient = client.resource(
            "Patient", identifier=[{"system": "urn:example:mrn", "value": f"PAGE-{n}"}]
        )
        patient.save()  # POST /fhir/Patient
        ids.append(patient.id)
    found = client.resources("Patient").search(_id=",".join(ids)).limit(2)
    page = found.fetch_raw()
    assert page["total"] == 3
    assert len(page["entry"]) == 2
    assert any(link["relation"] == "next" for link in page["link"])
    assert sorted(p.id for p in found.fetch_all()) == sorted(ids)


def test_fhirclient_as_a_referring_ehr(gateway: Gateway) -> None:
    smart = smart_client.FHIRClient(settings={"app_id": "referring-ehr", "api_base": gateway.base})
    smart.server.session.headers.update(gateway.auth)
    smart.prepare()  # reads the CapabilityStatement
    assert smart.server.capabilityStatement.fhirVersion == "4.0.1"

    resp = smart.server.post_json("", referral())  # POST /fhir/ (the base with its slash)
    assert resp.status_code == 200
    assert resp.history == []  # answered there, not redirected
    task_id = task_id_of(resp.json())

    search = Task.where(struct={"identifier": TASK_IDENTIFIER})
    found = list(search.perform_resources_iter(smart.server))
    assert [t.id for t in found] == [task_id]
    task = Task.read(task_id, smart.server)
    assert task.status == "received"
    task.status = "cancelled"
    task.statusReason = CodeableConcept({"text": REASON})
    task.update(smart.server)  # PUT /fhir/Task/{id}
    assert Task.read(task_id, smart.server).status == "cancelled"

    created = Patient({"identifier": [{"system": "urn:example:mrn", "value": "FC-1"}]}).create(
        smart.server
    )
    assert created is not None
    assert created["resourceType"] == "Patient"


def test_search_result_parameters(gateway: Gateway) -> None:
    pushed = requests.post(
        gateway.base,
        json=referral(),
        headers=gateway.auth | {"Content-Type": "application/fhir+json"},
        timeout=30,
    )
    task_id = task_id_of(pushed.json())

    def search(**params: str) -> requests.Response:
        return requests.get(f"{gateway.base}/Task", params=params, headers=gateway.auth, timeout=30)

    counted = search(identifier=TASK_IDENTIFIER, _summary="count").json()
    assert (counted["total"], "entry" in counted) == (1, False)
    zero = search(_id=task_id, _count="0").json()
    assert (zero["total"], "entry" in zero) == (1, False)
    both = search(_id=f"{task_id},other", identifier=TASK_IDENTIFIER).json()
    assert [e["resource"]["id"] for e in both["entry"]] == [task_id]
    assert search(_id="other", identifier=TASK_IDENTIFIER).json()["total"] == 0
    for fmt in ("json", "application/fhir+json", "application/json"):
        assert search(_id=task_id, _format=fmt).status_code == 200, fmt
    assert search(_id=task_id, _count="-1").status_code == 400
    assert search(_id=task_id, _summary="text").status_code == 400


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/metadata?_format=xml", {}),
        ("/metadata?_format=application/fhir%2Bxml", {}),
        ("/metadata", {"Accept": "application/fhir+xml"}),
        ("/Task?_id=x&_format=xml", {}),
    ],
)
def test_xml_is_refused_with_an_operation_outcome(
    gateway: Gateway, path: str, headers: dict[str, str]
) -> None:
    resp = requests.get(f"{gateway.base}{path}", headers=gateway.auth | headers, timeout=30)
    assert resp.status_code == 406
    assert resp.headers["content-type"].startswith("application/fhir+json")
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_json_and_wildcard_accept_are_served(gateway: Gateway) -> None:
    for accept in ("application/fhir+json", "application/json", "*/*", "text/html, */*;q=0.8"):
        resp = requests.get(f"{gateway.base}/metadata", headers={"Accept": accept}, timeout=30)
        assert resp.status_code == 200, accept
