"""One referral, one case, whoever pushes it how often (RF-11, RS-05, DESIGN "exactly once").

Runs on SQLite and on a real PostgreSQL (the `store` fixture): 20 clients push the same
transaction at the same moment over real HTTP (uvicorn on loopback), 3 rounds; identifiers of
any length; conditional create by query string; the transaction size limit; a busy database.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fhir_gateway.app import create_app
from fhir_gateway.errors import StoreBusyError
from fhir_gateway.intake import referrals
from fhir_gateway.sandbox.server import AppServer
from fhir_gateway.settings import Limits
from fhir_gateway.store import open_store
from fhir_gateway.store.models import Case, FhirResource, Job, ResourceIdentifier
from tests.conftest import FHIR_JSON, load_fixture

CLIENTS = 20
ROUNDS = 3


def referral(tag: str, *, long: int = 0) -> dict[str, Any]:
    """The fixture referral with its Patient/ServiceRequest/Task identifiers made unique by
    `tag` (and padded to `long` characters when given)."""
    bundle: dict[str, Any] = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
    for entry in bundle["entry"]:
        res, req = entry["resource"], entry["request"]
        if res["resourceType"] == "Organization":
            continue
        for ident in res["identifier"]:
            value = f"{ident['value']}-{tag}"
            ident["value"] = value + "x" * max(0, long - len(value))
        req.pop("ifNoneExist", None)
        req["ifNoneExist"] = f"identifier={res['identifier'][-1]['system']}|{ident['value']}"
    return bundle


def counts(store) -> dict[str, int]:
    with store.session(readonly=True) as s:
        return {
            t.__name__: s.scalar(select(func.count()).select_from(t)) or 0
            for t in (Case, FhirResource, ResourceIdentifier, Job)
        }


def test_twenty_identical_pushes_at_once_open_one_case(store, settings, tokens) -> None:
    """20 threads behind a barrier POST the same transaction to a real server; 3 rounds.
    Before: 16-19 cases per round on PostgreSQL (check-then-insert)."""
    app = create_app(settings, store=store, configure_logs=False)
    headers = tokens.headers("ehr") | FHIR_JSON
    with AppServer(app) as server:
        for round_no in range(ROUNDS):
            body = json.dumps(referral(f"round{round_no}"))
            barrier = threading.Barrier(CLIENTS)

            def push(_: int, body: str = body, barrier: threading.Barrier = barrier) -> Any:
                with requests.Session() as http:
                    barrier.wait()
                    return http.post(f"{server.url}/fhir", data=body, headers=headers, timeout=120)

            with ThreadPoolExecutor(CLIENTS) as pool:
                answers = list(pool.map(push, range(CLIENTS)))
            assert [a.status_code for a in answers] == [200] * CLIENTS, [
                a.text for a in answers if a.status_code != 200
            ]
            tasks = {a.json()["entry"][3]["response"]["location"] for a in answers}
            assert len(tasks) == 1  # every client was answered with the same Task
            statuses = [a.json()["entry"][3]["response"]["status"] for a in answers]
            assert statuses.count("201 Created") == 1
            assert statuses.count("200 OK") == CLIENTS - 1
            now = counts(store)
            assert now["Case"] == round_no + 1
            # Organization once, then Patient + ServiceRequest + Task per round; 2 jobs per case
            assert now["FhirResource"] == 1 + 3 * (round_no + 1)
            assert now["Job"] == 2 * (round_no + 1)


def test_600_character_identifiers_pushed_twice_make_one_case(store, settings, tokens) -> None:
    """Before: the index kept 512 characters and the lookup compared all 600: two cases."""
    app = create_app(settings, store=store, configure_logs=False)
    bundle = referral("long", long=600)
    for entry in bundle["entry"]:  # idempotent by identifier alone, no conditional create
        entry["request"].pop("ifNoneExist", None)
    with TestClient(app) as client:
        headers = tokens.headers("ehr") | FHIR_JSON
        first = client.post("/fhir", json=bundle, headers=headers)
        second = client.post("/fhir", json=bundle, headers=headers)
        assert (first.status_code, second.status_code) == (200, 200), second.text
        assert [e["response"]["status"] for e in second.json()["entry"]] == ["200 OK"] * 4
        # the stored versions and times (read with the identifier match on PostgreSQL)
        for was, now in zip(first.json()["entry"], second.json()["entry"], strict=True):
            for key in ("location", "etag", "lastModified"):
                assert now["response"][key] == was["response"][key], key
        assert second.json()["entry"][3]["response"]["etag"] == 'W/"2"'  # the received Task
        assert counts(store)["Case"] == 1
        task = second.json()["entry"][3]["response"]["location"].split("/_history")[0]
        token = bundle["entry"][3]["resource"]["identifier"][0]
        found = client.get(
            "/fhir/Task",
            params={"identifier": f"{token['system']}|{token['value']}"},
            headers=tokens.headers("ehr"),
        ).json()
        assert [f"Task/{e['resource']['id']}" for e in found["entry"]] == [task]
        # one character less is another identifier
        near = client.get(
            "/fhir/Task",
            params={"identifier": f"{token['system']}|{token['value'][:-1]}"},
            headers=tokens.headers("ehr"),
        ).json()
        assert near["total"] == 0


def test_608_character_reference_is_422_not_500(store, settings, tokens) -> None:
    """Before: a 500 on PostgreSQL (the value overflowed a 512-character column)."""
    app = create_app(settings, store=store, configure_logs=False)
    long_ref = "Patient/" + "a" * 600
    with TestClient(app) as client:
        headers = tokens.headers("ehr") | FHIR_JSON
        for where in ("reference", "identifier"):
            bundle = referral(f"ref-{where}")
            sr = bundle["entry"][2]["resource"]
            sr["subject"] = (
                {"reference": long_ref}
                if where == "reference"
                else {"identifier": {"system": "urn:test:mrn", "value": "m" * 600}}
            )
            resp = client.post("/fhir", json=bundle, headers=headers)
            assert resp.status_code == 422, resp.text
            issue = resp.json()["issue"][0]
            assert issue["expression"] == ["Bundle.entry[2].resource.subject"]
            assert "a" * 50 not in resp.text  # the value is not echoed
            assert "m" * 50 not in resp.text
        assert counts(store)["FhirResource"] == 0


def test_conditional_create_by_query_string(client, tokens) -> None:
    """`POST /fhir/Patient?identifier=...` (as fhirpy sends it) is conditional create: 201,
    then 200 with the same Patient; before, the query was ignored and a new one was made."""
    ehr = tokens.headers("ehr") | FHIR_JSON
    patient = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))["entry"][1][
        "resource"
    ]
    patient["identifier"] = [{"system": "urn:test:mrn", "value": "Q-1"}]
    query = {"identifier": "urn:test:mrn|Q-1"}
    first = client.post("/fhir/Patient", params=query, json=patient, headers=ehr)
    other = copy.deepcopy(patient)
    other["identifier"] = [{"system": "urn:test:mrn", "value": "Q-1-other"}]
    # criteria, not identifiers, decide: the body's identifier differs, the query matches
    second = client.post("/fhir/Patient", params=query, json=other, headers=ehr)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    # the same in a transaction entry's request.url
    bundle = referral("query")
    entry = bundle["entry"][1]
    entry["request"] = {"method": "POST", "url": "Patient?identifier=urn:test:mrn|Q-1"}
    resp = client.post("/fhir", json=bundle, headers=ehr)
    assert resp.status_code == 200, resp.text
    assert resp.json()["entry"][1]["response"]["location"].startswith(
        f"Patient/{first.json()['id']}/"
    )
    # unsupported criteria or two different ones: 400, nothing made
    for params, extra in (
        ({"name": "x"}, {}),
        (query, {"If-None-Exist": "identifier=urn:test:mrn|Q-2"}),
    ):
        bad = client.post("/fhir/Patient", params=params, json=patient, headers=ehr | extra)
        assert bad.status_code == 400, bad.text
        assert bad.json()["resourceType"] == "OperationOutcome"
    found = client.get(
        "/fhir/Patient", params={"identifier": "urn:test:mrn|Q-1"}, headers=tokens.headers("ehr")
    )
    assert found.json()["total"] == 1


def test_transaction_over_the_entry_limit_is_413_and_stores_nothing(settings, tokens) -> None:
    settings = settings.model_copy(update={"limits": Limits(max_transaction_entries=4)})
    app = create_app(settings, configure_logs=False)
    with TestClient(app) as client:
        headers = tokens.headers("ehr") | FHIR_JSON
        at_limit = client.post("/fhir", json=referral("four"), headers=headers)
        assert at_limit.status_code == 200, at_limit.text
        bundle = referral("five")
        extra = copy.deepcopy(bundle["entry"][1])
        extra["fullUrl"] = "urn:uuid:00000000-0000-4000-8000-000000000005"
        extra["resource"]["identifier"] = [{"system": "urn:test:mrn", "value": "five"}]
        extra["request"] = {"method": "POST", "url": "Patient"}
        bundle["entry"].append(extra)
        resp = client.post("/fhir", json=bundle, headers=headers)
        assert resp.status_code == 413
        issue = resp.json()["issue"][0]
        assert issue["expression"] == ["Bundle.entry"]
        assert "max_transaction_entries" in issue["diagnostics"]
        assert counts(app.state.store)["Case"] == 1


def test_reads_take_no_write_lock_and_a_locked_database_is_503(settings, tokens) -> None:
    """SQLite: while another connection holds the write lock, reads go on (read-only sessions
    BEGIN deferred) and writers give up after the busy timeout with StoreBusyError -> 503 +
    Retry-After, never a 500 "database is locked"."""
    store = open_store(settings.db_url, busy_timeout_s=0.2)
    app = create_app(settings, store=store, configure_logs=False)
    with TestClient(app) as client:
        headers = tokens.headers("ehr") | FHIR_JSON
        assert client.post("/fhir", json=referral("lock"), headers=headers).status_code == 200
        holder = sqlite3.connect(str(settings.data_dir / "gateway.db"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with store.session(readonly=True) as s:  # a reader is not held up by the lock
                assert s.scalar(select(func.count()).select_from(Case)) == 1
            with pytest.raises(StoreBusyError), store.session() as s:
                s.add(Job(id="j", kind="k", state="queued", payload={}, progress={}))
            with store.connection(readonly=True) as conn:  # the hot paths' Core reads too
                assert conn.scalar(select(func.count()).select_from(Case)) == 1
            with pytest.raises(StoreBusyError), store.connection() as conn:
                conn.execute(select(func.count()).select_from(Case))
            resp = client.post("/fhir", json=referral("locked"), headers=headers)
            assert resp.status_code == 503
            assert resp.headers["Retry-After"] == "1"
            assert resp.json()["issue"][0]["code"] == "transient"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert counts(store)["Case"] == 1
        assert client.post("/fhir", json=referral("locked"), headers=headers).status_code == 200
    store.dispose()


def test_sqlite_intake_runs_one_transaction_at_a_time(settings, tokens, monkeypatch) -> None:
    """On SQLite (one writer at a time anyway) referral transactions take one worker thread
    per process; the rest wait on the event loop. A second thread only added GIL handoffs and
    page cache reloads (api.fhir.INTAKE_THREADS). 8 different referrals at once: all answered,
    8 cases, never two transactions inside at the same moment."""
    store = open_store(settings.db_url)
    inside, most = 0, 0
    lock = threading.Lock()
    real = referrals.intake_transaction

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.02)  # long enough for a second thread to come in, were it allowed
            return real(*args, **kwargs)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(referrals, "intake_transaction", counted)
    app = create_app(settings, store=store, configure_logs=False)
    headers = tokens.headers("ehr") | FHIR_JSON
    try:
        with AppServer(app) as server:
            barrier = threading.Barrier(8)

            def push(n: int) -> int:
                with requests.Session() as http:
                    barrier.wait()
                    body = json.dumps(referral(f"one-at-a-time-{n}"))
                    return http.post(
                        f"{server.url}/fhir", data=body, headers=headers, timeout=120
                    ).status_code

            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(push, range(8))) == [200] * 8
        assert most == 1
        assert counts(store)["Case"] == 8
    finally:
        store.dispose()
