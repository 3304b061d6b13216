"""Append-only audit log with a hash chain: each row carries the hash of the one before it.

Rows are written in the same transaction as the action they record. `verify_chain` recomputes
every hash, so a changed, removed or inserted row is detected (`fhir-gateway audit verify`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway.store.models import AuditRow, utcnow

GENESIS = "0" * 64

# AuditEvent.outcome (http://hl7.org/fhir/audit-event-outcome)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"


@dataclass(frozen=True)
class Actor:
    sub: str
    role: str


def record(
    session: Session,
    action: str,
    actor: Actor,
    *,
    case_id: str | None = None,
    entity: list[str] | None = None,
    outcome: str = SUCCESS,
    request_id: str | None = None,
) -> AuditRow:
    """Append one audit row in the caller's transaction."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        # One writer at a time extends the chain (released at commit).
        session.execute(select(AuditRow.id).with_for_update().order_by(AuditRow.id.desc()).limit(1))
    prev = session.scalar(select(AuditRow.hash).order_by(AuditRow.id.desc()).limit(1)) or GENESIS
    row = AuditRow(
        recorded=utcnow(),
        action=action,
        outcome=outcome,
        agent=actor.sub,
        agent_role=actor.role,
        case_id=case_id,
        entity=entity or [],
        request_id=request_id,
        prev_hash=prev,
        hash="",
    )
    row.hash = _hash(prev, _content(row))
    session.add(row)
    session.flush()
    return row


def _content(row: AuditRow) -> dict[str, Any]:
    return {
        "recorded": row.recorded.isoformat(),
        "action": row.action,
        "outcome": row.outcome,
        "agent": row.agent,
        "agent_role": row.agent_role,
        "case_id": row.case_id,
        "entity": row.entity,
        "request_id": row.request_id,
    }


def _hash(prev: str, content: dict[str, Any]) -> str:
    data = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(prev.encode() + data).hexdigest()


def verify_chain(session: Session) -> tuple[int, int | None]:
    """(rows checked, id of the first bad row or None)."""
    prev = GENESIS
    count = 0
    for row in session.scalars(select(AuditRow).order_by(AuditRow.id)):
        count += 1
        if row.prev_hash != prev or row.hash != _hash(prev, _content(row)):
            return count, row.id
        prev = row.hash
    return count, None
