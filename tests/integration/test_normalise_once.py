"""One normalisation per change of inputs, with concurrent job workers, on SQLite and PostgreSQL.

Real workers (`jobs.Worker.run_once`) in threads claim `normalise_case` jobs of one case; the only
stand-in is a wrapper around `normalise._build` that counts builds and holds the first one open
so the others surely overlap it.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select

from fhir_gateway import job_handlers, jobs
from fhir_gateway.casebundle import normalise
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import CaseBuild, CaseBundleState, Job, StoredResource
from tests.conftest import add_case

SOURCE = "https://ehr.example/fhir"


def save(store: Store, case_id: str, body: dict[str, Any]) -> None:
    with store.session() as s:
        s.add(
            StoredResource(
                case_id=case_id,
                source=SOURCE,
                resource_type=body["resourceType"],
                source_id=body["id"],
                body=body,
            )
        )


def queue_normalise(store: Store, case_id: str, after: str) -> str:
    """What a pull job does at its end (`normalise.queue_after_pull`)."""
    with store.session() as s:
        pull = jobs.enqueue(s, "pull_fhir", case_id=case_id)
        pull.state = jobs.DONE
        key = f"normalise:{case_id}:{after}"
        job = jobs.enqueue(
            s, normalise.KIND, case_id=case_id, payload={"after": pull.id}, dedup_key=key
        )
        return job.id


def normalise_jobs(store: Store, case_id: str) -> list[Job]:
    with store.session() as s:
        return list(
            s.scalars(select(Job).where(Job.case_id == case_id, Job.kind == normalise.KIND))
        )


@pytest.fixture
def counted_builds(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], threading.Event]:
    """Builds counted (resources of the first source); the first build waits for `go`."""
    real = normalise._build
    builds: list[int] = []
    go = threading.Event()

    def build(*args: Any) -> Any:
        builds.append(sum(len(b.resources) for b in args[2]))
        if len(builds) == 1:
            go.wait(10)
        return real(*args)

    monkeypatch.setattr(normalise, "_build", build)
    job_handlers.register_all()
    return builds, go


def test_two_normalisations_at_the_same_instant_build_once(
    store: Store, settings: Settings, counted_builds: tuple[list[int], threading.Event]
) -> None:
    builds, go = counted_builds
    add_case(store, "c1", "Patient/p1")
    save(store, "c1", {"resourceType": "Patient", "id": "p1", "gender": "female"})
    for n in range(2):  # both pulls ended: each queued its normalisation
        queue_normalise(store, "c1", f"pull-{n}")
    start = threading.Barrier(2)
    workers = [jobs.Worker(store, settings) for _ in range(2)]

    def run(worker: jobs.Worker) -> None:
        start.wait()
        assert worker.run_once()

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    threading.Timer(0.5, go.set).start()  # the first build is held open for 0.5 s
    for t in threads:
        t.join(30)
    assert len(builds) == 1
    done = normalise_jobs(store, "c1")
    assert sorted(j.state for j in done) == ["done", "done"]
    outcomes = sorted(next(iter(j.progress["normalise"])) for j in done)
    assert outcomes == ["joined", "resources"]
    with store.session() as s:
        assert s.scalars(select(CaseBuild)).all() == []  # the claim is let go
    # A third normalisation with nothing new: no build.
    queue_normalise(store, "c1", "pull-2")
    assert jobs.Worker(store, settings).run_once()
    assert len(builds) == 1


def test_a_change_during_a_build_gets_exactly_one_more_build(
    store: Store, settings: Settings, counted_builds: tuple[list[int], threading.Event]
) -> None:
    builds, go = counted_builds
    add_case(store, "c2", "Patient/p2")
    save(store, "c2", {"resourceType": "Patient", "id": "p2", "gender": "male"})
    queue_normalise(store, "c2", "pull-0")
    first = threading.Thread(target=lambda: jobs.Worker(store, settings).run_once())
    first.start()
    for _ in range(200):  # until the first build is under way
        if builds:
            break
        threading.Event().wait(0.05)
    assert builds == [1]  # the build of the first source (the Patient alone) is under way
    # A pull saves a new Observation and queues its normalisation while the build runs.
    save(
        store,
        "c2",
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"text": "CEA"},
            "subject": {"reference": "Patient/p2"},
        },
    )
    queue_normalise(store, "c2", "pull-1")
    second = jobs.Worker(store, settings)
    assert second.run_once()  # ends at once: the build under way will see the change
    assert first.is_alive()
    assert len(builds) == 1
    go.set()
    first.join(30)
    assert len(builds) == 2  # exactly one more build, with the change in it
    with store.session() as s:
        state = s.get(CaseBundleState, "c2")
        assert state is not None
        assert state.counts.get("Observation") == 1
        assert s.scalars(select(CaseBuild)).all() == []
    assert sorted(j.state for j in normalise_jobs(store, "c2")) == ["done", "done"]
    while jobs.Worker(store, settings).run_once():  # nothing left that builds again
        pass
    assert len(builds) == 2
