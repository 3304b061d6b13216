"""The case view (`casebundle.derived`): the timeline, tumour-marker ranges, documents and studies
derived once at normalisation and stored beside the bundle. It is what the stored bundle rows
give (the page and GET /cases/{id}/timeline show the same events), a re-normalisation with new,
amended or fewer records replaces it, a view of another build or an older derivation is never
served, and a case normalised before migration 0017 derives it on its first read, also when many
readers arrive at once (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, update

from fhir_gateway.app import create_app
from fhir_gateway.casebundle import derived
from fhir_gateway.casebundle.normalise import normalise_case
from fhir_gateway.casebundle.timeline import timeline
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import (
    CaseBundleState,
    CaseView,
    NormalisedResource,
    StoredResource,
    utcnow,
)
from tests.conftest import Tokens
from tests.report_helpers import EHR
from tests.web.workspace_case import build_case

REVIEWER = "dr.view"
CEA = "2039-6"  # LOINC CEA, the demo patient's tumour marker


@pytest.fixture
def case(store: Store, settings: Settings) -> str:
    return build_case(store, settings, REVIEWER)


@pytest.fixture
def client(store: Store, settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, store=store, configure_logs=False)
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        yield c


def _timeline(client: TestClient, tokens: Tokens, case_id: str) -> dict[str, Any]:
    resp = client.get(f"/cases/{case_id}/timeline", headers=tokens.headers("admin"))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    out: dict[str, Any] = resp.json()
    return out


def _from_rows(store: Store, case_id: str) -> list[dict[str, Any]]:
    """The timeline computed again from every stored bundle row (the old way)."""
    with store.session(readonly=True) as s:
        bodies = s.scalars(
            select(NormalisedResource.body)
            .where(NormalisedResource.case_id == case_id)
            .order_by(NormalisedResource.position)
        ).all()
    return timeline(json.loads(b) for b in bodies)


def _get(client: TestClient, path: str) -> Any:
    page = client.get("/app/sign-in/dev")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    client.post(
        "/app/sign-in/dev", data={"csrf": csrf.group(1), "reviewer": REVIEWER, "role": "reviewer"}
    )
    return client.get(path)


def _page(client: TestClient, case_id: str) -> str:
    resp = _get(client, f"/app/cases/{case_id}")
    assert resp.status_code == 200, resp.text
    return str(resp.text)


def _points(html: str) -> list[str]:
    return re.findall(r"<title>(\d{4}-\d\d-\d\d: [^<]+)</title>", html)


def _stored(store: Store, case_id: str) -> tuple[CaseView | None, str]:
    with store.session(readonly=True) as s:
        view = s.get(CaseView, case_id)
        state = s.get(CaseBundleState, case_id)
        assert state is not None
        if view is not None:
            s.expunge(view)
        return view, state.etag


def _cea(store: Store, case_id: str) -> list[StoredResource]:
    with store.session() as s:
        rows = [
            r
            for r in s.scalars(select(StoredResource).where(StoredResource.case_id == case_id))
            if r.resource_type == "Observation"
            and any(c.get("code") == CEA for c in r.body.get("code", {}).get("coding", []))
        ]
        for r in rows:
            s.expunge(r)
        return rows


def test_the_stored_view_is_the_timeline_of_the_stored_bundle(
    store: Store, case: str, client: TestClient, tokens: Tokens
) -> None:
    view, etag = _stored(store, case)
    assert view is not None
    assert (view.etag, view.version) == (etag, derived.VERSION)
    served = _timeline(client, tokens, case)
    expected = _from_rows(store, case)
    assert served["events"] == expected
    assert (served["count"], served["etag"]) == (len(expected), etag)
    assert sum(e["kind"] == "tumour-marker" for e in expected) == 3
    # The page shows the same events: one chart point per CEA result, the documents, the PDF.
    html = _page(client, case)
    markers = [e for e in expected if e["kind"] == "tumour-marker"]
    assert len(_points(html)) == len(markers) == 3
    assert f"{len(expected)} events in date order" in html
    assert view.page["ranges"].keys() <= {e["resource"] for e in markers}
    inline = [d["contentType"] for d in view.page["documents"] if d["inline"]]
    assert set(inline) == {"application/pdf"}
    assert html.count('data="data:application/pdf;base64,') == len(inline)
    # The cases list shows the stored line of the same build.
    line = view.glance
    assert line["needs"] > 0
    assert f"{line['present']} of {line['needs']}" in _get(client, "/app").text


def test_a_re_normalisation_replaces_the_view_new_amended_and_removed_records(
    store: Store, settings: Settings, case: str, client: TestClient, tokens: Tokens
) -> None:
    before, _ = _stored(store, case)
    assert before is not None
    first = _cea(store, case)[0]
    # New record: a fourth CEA result arrives with a later pull.
    added = {
        **first.body,
        "id": "cea-new",
        "effectiveDateTime": "2031-05-04T09:00:00Z",
        "valueQuantity": {**first.body["valueQuantity"], "value": 42.5},
    }
    later = utcnow() + timedelta(seconds=5)
    with store.session() as s:
        s.add(
            StoredResource(
                case_id=case,
                source=EHR,
                resource_type="Observation",
                source_id="cea-new",
                body=added,
                fetched_at=later,
            )
        )
    normalise_case(store, settings, case)
    view, etag = _stored(store, case)
    assert view is not None
    assert view.etag == etag != before.etag
    events = _timeline(client, tokens, case)["events"]
    assert events == _from_rows(store, case)
    new = [e for e in events if e["date"] == "2031-05-04T09:00:00Z"]
    assert [(e["kind"], e["value"]["value"]) for e in new] == [("tumour-marker", 42.5)]
    html = _page(client, case)
    assert len(_points(html)) == 4
    assert any(p.startswith("2031-05-04: 42.5") for p in _points(html))

    # Amended data: the partner corrects the value; re-pulled, re-normalised.
    with store.session() as s:
        s.execute(
            update(StoredResource)
            .where(StoredResource.case_id == case, StoredResource.source_id == "cea-new")
            .values(
                body={**added, "valueQuantity": {**added["valueQuantity"], "value": 4.25}},
                fetched_at=later + timedelta(seconds=5),
            )
        )
    normalise_case(store, settings, case)
    events = _timeline(client, tokens, case)["events"]
    assert [e["value"]["value"] for e in events if e["date"] == "2031-05-04T09:00:00Z"] == [4.25]
    assert any(p.startswith("2031-05-04: 4.25") for p in _points(_page(client, case)))

    # Removed: the record is gone from the inputs; so is its event.
    with store.session() as s:
        s.execute(delete(StoredResource).where(StoredResource.source_id == "cea-new"))
    normalise_case(store, settings, case)
    events = _timeline(client, tokens, case)["events"]
    assert not [e for e in events if e["date"] == "2031-05-04T09:00:00Z"]
    assert events == _from_rows(store, case)
    assert len(_points(_page(client, case))) == 3


@pytest.mark.parametrize("how", ["missing", "other-build", "older-version"])
def test_a_view_not_of_the_stored_build_is_never_served(
    store: Store, case: str, client: TestClient, tokens: Tokens, how: str
) -> None:
    """`missing`: a case normalised before migration 0017; `other-build`: a view left from an
    earlier build (its ETag differs); `older-version`: derived by older code. Each is derived
    again from the stored rows on the first read and stored."""
    expected = _from_rows(store, case)
    with store.session() as s:
        if how == "missing":
            s.execute(delete(CaseView).where(CaseView.case_id == case))
        else:
            stale: dict[str, Any] = {
                "timeline": "[]",
                "page": {"count": 0, "ranges": {}, "documents": []},
                "glance": {"present": 99, "needs": 99, "missing": [], "question": "Stale?"},
            }
            stale |= {"etag": '"older"'} if how == "other-build" else {"version": 0}
            s.execute(update(CaseView).where(CaseView.case_id == case).values(**stale))
    # The cases list reads the bundle summary instead (and stores nothing).
    with store.session(readonly=True) as s:
        summary = s.get(CaseBundleState, case).summary  # type: ignore[union-attr]
    line = derived.glance(summary)
    listed = _get(client, "/app").text
    assert f"{line['present']} of {line['needs']}" in listed
    assert "99 of 99" not in listed
    assert "Stale?" not in listed
    assert (_stored(store, case)[0] is None) == (how == "missing")
    assert _timeline(client, tokens, case)["events"] == expected
    view, etag = _stored(store, case)
    assert view is not None
    assert (view.etag, view.version, json.loads(view.timeline)) == (etag, derived.VERSION, expected)
    assert view.glance == line
    if how == "missing":  # the page too, from a fresh start
        with store.session() as s:
            s.execute(delete(CaseView).where(CaseView.case_id == case))
        assert len(_points(_page(client, case))) == 3


def test_many_first_readers_of_a_case_without_a_view_all_get_it_and_one_is_stored(
    store: Store, settings: Settings, case: str, tokens: Tokens
) -> None:
    """Eight readers at once on a case normalised before the view existed: every one gets the
    timeline (no 5xx from two inserts of the same row), and one view is stored."""
    with store.session() as s:
        s.execute(delete(CaseView).where(CaseView.case_id == case))
    expected = _from_rows(store, case)
    app = create_app(settings, store=store, configure_logs=False)
    barrier = threading.Barrier(8)
    results: list[tuple[int, Any]] = []

    headers = tokens.headers("admin")
    # The database's first audit row is written alone: on PostgreSQL two first rows at once
    # collide on the audit checkpoint (security/audit.py, reported separately), not our concern.
    with TestClient(app) as c:
        assert c.get(f"/cases/{case}/summary", headers=headers).status_code == 200

    def read(c: TestClient) -> None:
        barrier.wait()
        resp = c.get(f"/cases/{case}/timeline", headers=headers)
        results.append((resp.status_code, resp.json()))

    with TestClient(app) as c:  # handlers run in the app's worker threads, concurrently
        threads = [threading.Thread(target=read, args=(c,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert [status for status, _ in results] == [200] * 8, results
    assert all(body["events"] == expected for _, body in results)
    with store.session(readonly=True) as s:
        views = s.scalars(select(CaseView).where(CaseView.case_id == case)).all()
        assert [(v.etag, v.version) for v in views] == [
            (s.get(CaseBundleState, case).etag, derived.VERSION)  # type: ignore[union-attr]
        ]


def test_derive_lists_documents_without_their_data_and_ranges_of_markers() -> None:
    pdf = {"contentType": "application/pdf; charset=binary", "data": "JVBERi0=", "title": "Path"}
    resources: list[tuple[int, dict[str, Any]]] = [
        (0, {"resourceType": "Patient", "id": "p"}),
        (
            1,
            {
                "resourceType": "DocumentReference",
                "id": "d",
                "date": "2026-01-02T00:00:00Z",
                "type": {"coding": [{"display": "Pathology"}]},
                "content": [{"attachment": pdf}, {"attachment": {"url": "https://x/y.pdf"}}],
            },
        ),
        (
            2,
            {
                "resourceType": "Observation",
                "id": "o",
                "meta": {"tag": [{"system": "urn:fhir-gateway:class", "code": "tumor-marker"}]},
                "code": {"text": "CEA"},
                "effectiveDateTime": "2026-01-01",
                "valueQuantity": {"value": 3, "unit": "ng/mL"},
                "referenceRange": [{"high": {"value": 5}}],
            },
        ),
        (
            3,
            {
                "resourceType": "ImagingStudy",
                "id": "i",
                "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
                "series": [{"modality": {"code": "CT"}}],
            },
        ),
    ]
    events, page = derived.derive(resources)
    assert [e["resource"] for e in events] == [
        "Observation/o",
        "DocumentReference/d",
        "ImagingStudy/i",
    ]
    assert page["count"] == 3
    assert page["ranges"] == {"Observation/o": [None, 5.0]}
    assert page["documents"] == [
        {
            "id": "d",
            "n": 0,
            "position": 1,
            "title": "Path",
            "date": "2026-01-02",
            "contentType": "application/pdf",
            "url": None,
            "inline": True,
        },
        {
            "id": "d",
            "n": 1,
            "position": 1,
            "title": "Pathology",
            "date": "2026-01-02",
            "contentType": "unknown",
            "url": "https://x/y.pdf",
            "inline": False,
        },
    ]
    assert "JVBERi0=" not in json.dumps(page)  # the bytes stay in the bundle row
    assert page["studies"] == [
        {
            "id": "i",
            "uid": "1.2.3",
            "started": "",
            "description": "Imaging study",
            "modalities": "CT",
            "series": None,
            "instances": None,
        }
    ]
