"""The same document received several times at once is kept once (one CaseDocument, one set of
resources, one normalise job), on SQLite and PostgreSQL; and the same file into two cases at once
shares one Binary row without a failure."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import func, select

from fhir_gateway.records import documents
from fhir_gateway.security.audit import Actor
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import Binary, CaseDocument, Job, StoredResource
from tests.conftest import FIXTURES, add_case

CCD = FIXTURES / "ccda" / "CCD_2.xml"
PDF = FIXTURES / "pdf" / "text-report.pdf"
THREADS = 6


def _keep(store: Store, settings: Settings, case_id: str, path: Path) -> documents.Kept:
    data = path.read_bytes()
    found = documents.read_document(data, None, "urn:test")
    kept = documents.keep_document(
        store,
        settings.data_dir,
        settings.base_url,
        case_id,
        data,
        found,
        origin=documents.UPLOAD,
        source="urn:fhir-gateway:upload:test",
        declared_type="",
        actor=Actor("tester", "ehr"),
    )
    with store.session() as s:
        documents.queue_normalise(s, case_id, [kept.document_id])
    return kept


def _race(store: Store, settings: Settings, jobs: list[tuple[str, Path]]) -> list[object]:
    barrier = threading.Barrier(len(jobs))
    results: list[object] = []

    def one(case_id: str, path: Path) -> None:
        barrier.wait()
        try:
            results.append(_keep(store, settings, case_id, path))
        except Exception as exc:  # the test reports any failure
            results.append(exc)

    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_same_document_at_once_kept_once(store: Store, settings: Settings) -> None:
    add_case(store, "case-1", "Patient/p1")
    results = _race(store, settings, [("case-1", CCD)] * THREADS)
    assert all(isinstance(r, documents.Kept) for r in results), results
    assert sum(1 for r in results if isinstance(r, documents.Kept) and r.new) == 1
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(CaseDocument)) == 1
        rows = s.scalar(
            select(func.count())
            .select_from(StoredResource)
            .where(StoredResource.source.like(f"{documents.SOURCE_PREFIX}%"))
        )
        assert rows == 17  # the C-CDA mapper's 17 resources, once
        normalise_jobs = s.scalar(
            select(func.count()).select_from(Job).where(Job.kind == "normalise_case")
        )
        assert normalise_jobs == 1


def test_same_file_into_two_cases_at_once(store: Store, settings: Settings) -> None:
    add_case(store, "case-a", "Patient/pa")
    add_case(store, "case-b", "Patient/pb")
    results = _race(store, settings, [("case-a", PDF), ("case-b", PDF)] * 2)
    assert all(isinstance(r, documents.Kept) for r in results), results
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(CaseDocument)) == 2
        # the PDF and its extracted text: one Binary row each, shared by both cases
        assert s.scalar(select(func.count()).select_from(Binary)) == 2
