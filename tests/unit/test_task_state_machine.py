"""RF-03/RF-04: every (from, to) pair of Task statuses against the transition table."""

from __future__ import annotations

import itertools

import pytest

from fhir_gateway.errors import ConflictError, ValidationError
from fhir_gateway.intake import hosted, tasks
from fhir_gateway.store import open_store

STATUSES = sorted(tasks.TRANSITIONS)
ALLOWED = {
    ("requested", "received"),
    ("requested", "accepted"),
    ("requested", "rejected"),
    ("requested", "cancelled"),
    ("received", "accepted"),
    ("received", "rejected"),
    ("received", "cancelled"),
    ("accepted", "in-progress"),
    ("accepted", "cancelled"),
    ("in-progress", "on-hold"),
    ("in-progress", "completed"),
    ("in-progress", "failed"),
    ("in-progress", "cancelled"),
    ("on-hold", "in-progress"),
    ("on-hold", "cancelled"),
}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('sm') / 'db.sqlite'}")
    yield store
    store.dispose()


@pytest.mark.parametrize(("current", "target"), list(itertools.product(STATUSES, STATUSES)))
def test_transition(db, current, target) -> None:
    with db.session() as s:
        row = hosted.create(
            s, {"resourceType": "Task", "status": current, "intent": "order"}, partner_id=None
        )
        version = row.version_id
        reason = "because" if target in tasks.REASON_REQUIRED else None
        if (current, target) in ALLOWED:
            tasks.transition_task(s, row, target, reason)
            assert row.body["status"] == target
            assert row.version_id == version + 1
            assert ("statusReason" in row.body) == (reason is not None)
        else:
            with pytest.raises(ConflictError):
                tasks.transition_task(s, row, target, reason)
            assert row.body["status"] == current


@pytest.mark.parametrize("target", sorted(tasks.REASON_REQUIRED - {"on-hold", "failed"}))
def test_reason_required(db, target) -> None:
    with db.session() as s:
        row = hosted.create(
            s, {"resourceType": "Task", "status": "received", "intent": "order"}, partner_id=None
        )
        with pytest.raises(ValidationError):
            tasks.transition_task(s, row, target, None)
