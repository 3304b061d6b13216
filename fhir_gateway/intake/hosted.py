"""Resources we host at /fhir (referral Patient, ServiceRequest, Task, ...): versions, identifiers.

Each write bumps `meta.versionId` (served as `ETag: W/"n"`) and `meta.lastUpdated`; identifiers
are indexed for conditional create (`If-None-Exist: identifier=...`) and `?identifier=` search.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from fhir_gateway.errors import InputError, NotFoundError, PreconditionFailedError
from fhir_gateway.resources import Resource, identifiers_of, split_token
from fhir_gateway.store.models import FhirResource, ResourceIdentifier, utcnow

# What a partner may push to us (a referral and what supports it).
HOSTED_TYPES = frozenset(
    {
        "Patient",
        "ServiceRequest",
        "Task",
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "DocumentReference",
        "ImagingStudy",
        "Condition",
        "DiagnosticReport",
        "Observation",
    }
)


def fhir_instant(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def create(
    session: Session,
    body: Resource,
    *,
    partner_id: str | None,
    case_id: str | None = None,
    rid: str | None = None,
) -> FhirResource:
    """Store a new resource under a server id (`rid`, or a new one; a client id is ignored,
    RS-04)."""
    now = utcnow()
    body = copy.deepcopy(body)
    rid = rid or str(uuid.uuid4())
    body["id"] = rid
    body["meta"] = {**(body.get("meta") or {}), "versionId": "1", "lastUpdated": fhir_instant(now)}
    row = FhirResource(
        resource_type=body["resourceType"],
        id=rid,
        version_id=1,
        partner_id=partner_id,
        case_id=case_id,
        last_updated=now,
        body=body,
    )
    session.add(row)
    _index(session, row)
    session.flush()
    return row


def update(session: Session, row: FhirResource, body: Resource) -> FhirResource:
    """Write a new version of `row` with `body`."""
    now = utcnow()
    body = copy.deepcopy(body)
    row.version_id += 1
    body["id"] = row.id
    body["meta"] = {
        **(body.get("meta") or {}),
        "versionId": str(row.version_id),
        "lastUpdated": fhir_instant(now),
    }
    row.body = body
    row.last_updated = now
    session.execute(
        delete(ResourceIdentifier).where(
            ResourceIdentifier.resource_type == row.resource_type,
            ResourceIdentifier.resource_id == row.id,
        )
    )
    _index(session, row)
    session.flush()
    return row


def _index(session: Session, row: FhirResource) -> None:
    for system, value in set(identifiers_of(row.body)):
        session.add(
            ResourceIdentifier(
                resource_type=row.resource_type,
                resource_id=row.id,
                system=system[:512],
                value=value[:512],
            )
        )


def read(session: Session, resource_type: str, rid: str) -> FhirResource:
    row = session.get(FhirResource, (resource_type, rid))
    if row is None:
        raise NotFoundError(f"{resource_type}/{rid} is not known")
    return row


def find_by_identifier(
    session: Session, resource_type: str, token: str, *, partner_id: str | None
) -> Sequence[FhirResource]:
    """Resources of a type with identifier `system|value` (or bare `value`), for one partner
    (`partner_id` None: all partners)."""
    system, value = split_token(token)
    stmt = (
        select(FhirResource)
        .join(
            ResourceIdentifier,
            (ResourceIdentifier.resource_type == FhirResource.resource_type)
            & (ResourceIdentifier.resource_id == FhirResource.id),
        )
        .where(ResourceIdentifier.resource_type == resource_type, ResourceIdentifier.value == value)
        .distinct()
    )
    if system is not None:
        stmt = stmt.where(ResourceIdentifier.system == system)
    if partner_id is not None:
        stmt = stmt.where(FhirResource.partner_id == partner_id)
    return session.scalars(stmt).all()


def conditional_match(
    session: Session, resource_type: str, criteria: str, *, partner_id: str | None
) -> FhirResource | None:
    """Evaluate `If-None-Exist` criteria (RS-05): None for no match, the row for one match.

    Raises:
        PreconditionFailedError: several resources match.
        InputError: criteria other than `identifier=` (the only one we index).
    """
    criteria = criteria.split("?", 1)[-1]
    params = [p for p in criteria.split("&") if p]
    if len(params) != 1 or not params[0].startswith("identifier="):
        raise InputError(
            "If-None-Exist supports only 'identifier=system|value'",
            expression=[f"{resource_type}.identifier"],
        )
    matches = find_by_identifier(
        session, resource_type, params[0].split("=", 1)[1], partner_id=partner_id
    )
    if len(matches) > 1:
        raise PreconditionFailedError(
            f"If-None-Exist matched {len(matches)} {resource_type} resources"
        )
    return matches[0] if matches else None
