"""Referral progress notifications (R4 Subscriptions Backport IG 1.1.0, topic-based, rest-hook):
a loopback receiver gets the handshake, one notification per Task change with increasing event
numbers, heartbeats; `$status` agrees; a receiver down for a while gets every event once, in
order, after it comes back; concurrent workers send each event number once (SQLite and
PostgreSQL); partners see only their own subscriptions and Tasks."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fhir_gateway import job_handlers, jobs
from fhir_gateway.app import create_app
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import FhirResource, Job, SubscriptionState
from tests.conftest import FHIR_JSON, Tokens, load_fixture
from tests.notify_helpers import (
    NOTIFY_KINDS,
    Receiver,
    event_numbers,
    param,
    run_notify_jobs,
    status_params,
    subscription,
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def app(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store=store, configure_logs=False)) as c:
        yield c


def _subscribe(app: TestClient, tokens: Tokens, body: dict[str, Any]) -> str:
    resp = app.post("/fhir/Subscription", json=body, headers=tokens.headers("ehr") | FHIR_JSON)
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "requested"
    return str(resp.json()["id"])


def _refer(app: TestClient, tokens: Tokens) -> str:
    bundle = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
    resp = app.post("/fhir", json=bundle, headers=tokens.headers("ehr") | FHIR_JSON)
    assert resp.status_code == 200, resp.text
    return str(app.get("/cases", headers=tokens.headers("admin")).json()[0]["id"])


def _move(app: TestClient, tokens: Tokens, case_id: str, status: str, reason: str = "") -> None:
    body = {"status": status, **({"reason": reason} if reason else {})}
    resp = app.post(f"/cases/{case_id}/status", json=body, headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text


def _status(app: TestClient, tokens: Tokens, sid: str) -> dict[str, Any]:
    resp = app.get(f"/fhir/Subscription/{sid}/$status", headers=tokens.headers("ehr"))
    assert resp.status_code == 200, resp.text
    return resp.json()["entry"][0]["resource"]  # type: ignore[no-any-return]


def test_handshake_events_heartbeat_status_and_outage(app, settings, store, tokens, receiver):
    """ST-SUB-01..05: handshake, one notification per Task change with event numbers 1..n,
    `$status` agreeing, every event once and in order across an outage, heartbeats."""
    sid = _subscribe(app, tokens, subscription(receiver.url, content="full-resource"))
    run_notify_jobs(store, settings)
    [handshake] = receiver.of_type("handshake")
    assert param(status_params(handshake), "events-since-subscription-start") == "0"
    assert receiver.headers[0]["Authorization"] == "Bearer receiver-secret"
    sub = app.get(f"/fhir/Subscription/{sid}", headers=tokens.headers("ehr")).json()
    assert sub["status"] == "active"

    case_id = _refer(app, tokens)  # Task requested -> received: event 1
    _move(app, tokens, case_id, "accepted")
    _move(app, tokens, case_id, "in-progress")
    run_notify_jobs(store, settings)
    events = receiver.of_type("event-notification")
    assert [event_numbers(b) for b in events] == [[1], [2], [3]]
    assert [b["type"] for b in events] == ["history"] * 3
    # full-resource: the Task as it was after each change, in order
    statuses = [b["entry"][1]["resource"]["status"] for b in events]
    assert statuses == ["received", "accepted", "in-progress"]
    status = _status(app, tokens, sid)
    assert param(status, "events-since-subscription-start") == "3"
    assert param(status, "type") == "query-status"
    assert param(status, "status") == "active"

    # The receiver is down: two more changes are queued, sending fails and is retried.
    receiver.stop()
    _move(app, tokens, case_id, "on-hold", "waiting for slides")
    _move(app, tokens, case_id, "in-progress")
    run_notify_jobs(store, settings, max_runs=6)
    assert param(_status(app, tokens, sid), "status") == "error"
    assert param(_status(app, tokens, sid), "events-since-subscription-start") == "5"
    receiver.start()
    deadline = time.monotonic() + 30
    while receiver.event_numbers() != [1, 2, 3, 4, 5] and time.monotonic() < deadline:
        run_notify_jobs(store, settings)
        time.sleep(0.05)
    assert receiver.event_numbers() == [1, 2, 3, 4, 5]  # each once, in order
    assert param(_status(app, tokens, sid), "status") == "active"

    # A cancellation closes the case's jobs, but its own notification still goes out.
    resp = app.put(
        f"/fhir/Task/{_task_id(store, case_id)}",
        json={
            "resourceType": "Task",
            "status": "cancelled",
            "intent": "order",
            "statusReason": {"text": "patient moved"},
        },
        headers=tokens.headers("ehr") | FHIR_JSON,
    )
    assert resp.status_code == 200, resp.text
    run_notify_jobs(store, settings)
    assert receiver.event_numbers() == [1, 2, 3, 4, 5, 6]
    last = receiver.of_type("event-notification")[-1]
    assert last["entry"][1]["resource"]["status"] == "cancelled"


def test_heartbeat_when_nothing_happens(app, settings, store, tokens, receiver):
    sid = _subscribe(app, tokens, subscription(receiver.url, heartbeat=1))
    run_notify_jobs(store, settings)
    assert len(receiver.of_type("handshake")) == 1
    time.sleep(1.1)  # one heartbeat period with no traffic (simulating less would need a clock)
    run_notify_jobs(store, settings)
    beats = receiver.of_type("heartbeat")
    assert len(beats) == 1
    assert param(status_params(beats[0]), "events-since-subscription-start") == "0"
    with store.session() as s:  # the next heartbeat is queued
        queued = s.scalars(select(Job).where(Job.kind == "subscription_heartbeat")).all()
        assert sorted(j.state for j in queued) == ["done", "queued"]
    resp = app.delete(f"/fhir/Subscription/{sid}", headers=tokens.headers("ehr"))
    assert resp.status_code == 204
    assert app.get(f"/fhir/Subscription/{sid}", headers=tokens.headers("ehr")).status_code == 404


def test_id_only_payload_and_filter(app, settings, store, tokens, receiver):
    """`id-only` carries the Task's URL and no resource; a `Task?status=` filter narrows."""
    _subscribe(app, tokens, subscription(receiver.url, filter="Task?status=accepted,completed"))
    run_notify_jobs(store, settings)
    case_id = _refer(app, tokens)
    _move(app, tokens, case_id, "accepted")
    _move(app, tokens, case_id, "in-progress")
    run_notify_jobs(store, settings)
    [only] = receiver.of_type("event-notification")
    assert event_numbers(only) == [1]
    focus = only["entry"][1]
    assert "resource" not in focus
    assert focus["fullUrl"].endswith(f"/fhir/Task/{_task_id(store, case_id)}")


def test_partner_isolation_and_validation(app, settings, store, tokens, receiver):
    sid = _subscribe(app, tokens, subscription(receiver.url))
    other = tokens.headers("ehr", partner="mercy-north")
    assert app.get(f"/fhir/Subscription/{sid}", headers=other).status_code == 403
    assert app.get(f"/fhir/Subscription/{sid}/$status", headers=other).status_code == 403
    assert app.delete(f"/fhir/Subscription/{sid}", headers=other).status_code == 403
    reviewer = tokens.headers("reviewer")
    assert (
        app.post(
            "/fhir/Subscription", json=subscription(receiver.url), headers=reviewer | FHIR_JSON
        ).status_code
        == 403
    )
    # Mercy North's subscription hears nothing of St Elsewhere's referral.
    resp = app.post(
        "/fhir/Subscription", json=subscription(receiver.url), headers=other | FHIR_JSON
    )
    other_sid = resp.json()["id"]
    run_notify_jobs(store, settings)
    _refer(app, tokens)
    run_notify_jobs(store, settings)
    with store.session() as s:
        assert s.get(SubscriptionState, other_sid).events_since_start == 0
        assert s.get(SubscriptionState, sid).events_since_start == 1

    bad_cases: list[tuple[dict[str, Any], str]] = [
        ({"criteria": "http://elsewhere/topic"}, "Subscription.criteria"),
        ({"channel": {"type": "websocket"}}, "Subscription.channel.type"),
        (
            {
                "_criteria": {
                    "extension": [
                        {
                            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
                            "valueString": "Task?patient=Patient/secret-1",
                        }
                    ]
                }
            },
            "Subscription._criteria.extension[backport-filter-criteria]",
        ),
    ]
    for change, where in bad_cases:
        body = subscription("http://127.0.0.1:1/hook") | change
        with store.session() as s:
            before = len(
                s.scalars(
                    select(FhirResource).where(FhirResource.resource_type == "Subscription")
                ).all()
            )
        resp = app.post("/fhir/Subscription", json=body, headers=tokens.headers("ehr") | FHIR_JSON)
        assert resp.status_code == 422, resp.text
        outcome = resp.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["expression"] == [where]
        assert "secret-1" not in resp.text
        assert "elsewhere/topic" not in resp.text
        with store.session() as s:
            after = len(
                s.scalars(
                    select(FhirResource).where(FhirResource.resource_type == "Subscription")
                ).all()
            )
        assert after == before
    resp = app.post(
        "/fhir/Subscription",
        json=subscription("http://ehr.example.org/hook"),
        headers=tokens.headers("ehr") | FHIR_JSON,
    )
    assert resp.status_code == 422  # plain http off loopback


def test_concurrent_workers_send_each_event_once_in_order(app, settings, store, tokens, receiver):
    """Three workers on one store (SQLite, PostgreSQL): 8 Task changes -> event numbers 1..8,
    each received exactly once, in order."""
    _subscribe(app, tokens, subscription(receiver.url))
    run_notify_jobs(store, settings)
    case_id = _refer(app, tokens)
    _move(app, tokens, case_id, "accepted")
    for i in range(3):
        _move(app, tokens, case_id, "in-progress")
        _move(app, tokens, case_id, "on-hold", f"pause {i}")
    _move(app, tokens, case_id, "in-progress")
    job_handlers.register_all()
    workers = [jobs.Worker(store, settings, name=f"w{i}", kinds=NOTIFY_KINDS) for i in range(3)]
    threads = [threading.Thread(target=w.run_forever, daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(receiver.event_numbers()) < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything sent twice would arrive now
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(10)
    assert receiver.event_numbers() == list(range(1, 10))


def _task_id(store: Store, case_id: str) -> str:
    from fhir_gateway.store.models import Case

    with store.session() as s:
        case = s.get(Case, case_id)
        assert case is not None
        return case.task_id


def test_capability_statement_and_topic_name_what_is_served(app, tokens, store):
    cs = app.get("/fhir/metadata").json()
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    sub = by_type["Subscription"]
    assert {i["code"] for i in sub["interaction"]} == {"create", "read", "delete"}
    [canonical] = [e["valueCanonical"] for e in sub["extension"]]
    assert canonical == "http://127.0.0.1:8080/fhir/SubscriptionTopic/referral-task-status"
    assert {i["code"] for i in by_type["Communication"]["interaction"]} == {"create", "read"}
    topic = app.get("/fhir/Basic/referral-task-status", headers=tokens.headers("ehr")).json()
    assert topic["code"]["coding"][0]["code"] == "SubscriptionTopic"
    urls = {e["url"].rsplit(".", 1)[-1]: e for e in topic["extension"]}
    assert urls["url"]["valueUri"] == canonical
    assert app.get("/fhir/Basic/other", headers=tokens.headers("ehr")).status_code == 404
