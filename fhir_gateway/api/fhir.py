"""FHIR R4 endpoint for referring EHRs at /fhir: metadata, transaction, create, read, search,
and Task status updates."""

from __future__ import annotations

import copy
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from fhir_gateway.api.deps import ANY_ROLE, EHR_OR_ADMIN, Body, SettingsDep, StoreDep
from fhir_gateway.api.responses import FhirResponse
from fhir_gateway.errors import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    PreconditionFailedError,
    ValidationError,
)
from fhir_gateway.intake import hosted, referrals, tasks
from fhir_gateway.intake.validation import validate_resource
from fhir_gateway.resources import Resource
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.security.smart_server import permits
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import FhirResource

router = APIRouter(prefix="/fhir", tags=["fhir"])

SEARCHABLE = ("Task", "ServiceRequest", "Patient")
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
IfNoneExist = Annotated[str | None, Header(alias="If-None-Exist")]
IfNoneMatch = Annotated[str | None, Header(alias="If-None-Match")]
IfMatch = Annotated[str | None, Header(alias="If-Match")]
# The body is read raw (size-limited) rather than through FastAPI; describe it for OpenAPI.
FHIR_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/fhir+json": {"schema": {"type": "object"}}},
    }
}


def _etag(row: FhirResource) -> str:
    return f'W/"{row.version_id}"'


def _headers(row: FhirResource) -> dict[str, str]:
    return {
        "ETag": _etag(row),
        "Location": f"{row.resource_type}/{row.id}/_history/{row.version_id}",
        "Last-Modified": row.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT"),
    }


def _patient_of(row: FhirResource) -> str | None:
    """The patient a hosted resource is about (for the audit trail)."""
    if row.resource_type == "Patient":
        return f"Patient/{row.id}"
    for key in ("for", "subject", "patient"):
        ref = (row.body.get(key) or {}).get("reference")
        if isinstance(ref, str):
            return ref
    return None


def _our_org(settings: Settings) -> Resource:
    ident = settings.partners.organization.identifier
    return {
        "identifier": {"system": ident.system, "value": ident.value},
        "display": settings.partners.organization.name,
    }


def _require_scope(who: Principal, resource_type: str, letter: str) -> None:
    """SMART scopes of a partner's access token, per interaction (SM-23): c r u d s."""
    if who.scopes is not None and not permits(who.scopes, resource_type, letter):
        raise ForbiddenError(f"token scopes do not permit '{letter}' on {resource_type}")


def _check_access(row: FhirResource, who: Principal, store_session: Any) -> None:
    if who.role == "admin":
        return
    if who.role == "ehr" and row.partner_id == who.partner_id:
        return
    if who.role == "reviewer" and row.case_id:
        visible = access.visible_case_ids(store_session, who) or []
        if row.case_id in visible:
            return
    raise ForbiddenError(f"{row.resource_type}/{row.id} is not yours to read")


@router.get("/metadata", response_class=FhirResponse)
def metadata(settings: SettingsDep) -> FhirResponse:
    """CapabilityStatement: what this endpoint really supports."""
    return FhirResponse(capability_statement(settings))


def capability_statement(settings: Settings) -> Resource:
    def res(rtype: str, interactions: list[str], search: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": i} for i in interactions],
            "versioning": "versioned",
            "readHistory": False,
            "updateCreate": False,
            "conditionalCreate": True,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
        }
        if search:
            out["searchParam"] = [{"name": "identifier", "type": "token"}]
        return out

    resources = [
        res("Task", ["read", "create", "update", "search-type"], True),
        res("ServiceRequest", ["read", "create", "search-type"], True),
        res("Patient", ["read", "create", "search-type"], True),
    ] + [res(t, ["read", "create"], False) for t in sorted(hosted.HOSTED_TYPES - set(SEARCHABLE))]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-24",
        "kind": "instance",
        "software": {"name": "fhir-gateway", "version": "0.1.0"},
        "implementation": {
            "description": "fhir-gateway referral endpoint",
            "url": f"{settings.base_url}/fhir",
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    # SMART's oauth-uris extension (SMART App Launch 2.2 keeps it for older
                    # clients; .well-known/smart-configuration is the primary discovery).
                    "extension": [
                        {
                            "url": OAUTH_URIS,
                            "extension": [
                                {"url": "token", "valueUri": f"{settings.base_url}/auth/token"}
                            ],
                        }
                    ],
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "OAuth",
                                }
                            ]
                        }
                    ],
                    "description": "Bearer JWT required on every interaction except metadata.",
                },
                "resource": resources,
                "interaction": [{"code": "transaction"}],
            }
        ],
    }


@router.post("", response_class=FhirResponse, openapi_extra=FHIR_BODY)
async def transaction(
    bundle: Body, store: StoreDep, settings: SettingsDep, who: Principal = EHR_OR_ADMIN
) -> FhirResponse:
    """POST a referral transaction Bundle (RS-30); answered with a transaction-response."""

    for entry in bundle.get("entry") or [] if isinstance(bundle, dict) else []:
        rtype = (
            (entry.get("resource") or {}).get("resourceType") if isinstance(entry, dict) else None
        )
        if isinstance(rtype, str):
            _require_scope(who, rtype, "c")  # authorised per inner request (RS-32)

    def run() -> Resource:
        with store.session() as s:
            result = referrals.intake_transaction(
                s, bundle, who, settings.partners, _our_org(settings)
            )
            return _transaction_response(result)

    return FhirResponse(await run_in_threadpool(run))


def _transaction_response(result: referrals.IntakeResult) -> Resource:
    entries = []
    for out in result.entries:
        row = out.row
        entries.append(
            {
                "response": {
                    "status": out.status,
                    "location": f"{row.resource_type}/{row.id}/_history/{row.version_id}",
                    "etag": _etag(row),
                    "lastModified": hosted.fhir_instant(row.last_updated),
                }
            }
        )
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


@router.post("/{resource_type}", response_class=FhirResponse, openapi_extra=FHIR_BODY)
async def create(
    resource_type: str,
    body: Body,
    store: StoreDep,
    settings: SettingsDep,
    if_none_exist: IfNoneExist = None,
    who: Principal = EHR_OR_ADMIN,
) -> FhirResponse:
    """Create one resource, with conditional create (RS-05: 0 -> 201, 1 -> 200, >1 -> 412)."""
    if resource_type not in hosted.HOSTED_TYPES:
        raise NotFoundError(f"resource type {resource_type} is not supported here")
    _require_scope(who, resource_type, "c")
    if not isinstance(body, dict) or body.get("resourceType") != resource_type:
        raise ValidationError(
            f"body must be a {resource_type} resource", expression=[resource_type], status_code=400
        )

    def run() -> tuple[Resource, dict[str, str], int]:
        with store.session() as s:
            result = referrals.intake_single(
                s, body, who, settings.partners, if_none_exist, _our_org(settings)
            )
            out = result.entries[0]
            if result.case_id is None and out.created:  # a referral Task audits its own intake
                audit.record(
                    s,
                    "resource.create",
                    who.actor,
                    patient=_patient_of(out.row),
                    entity=[f"{out.row.resource_type}/{out.row.id}"],
                )
            return out.row.body, _headers(out.row), 201 if out.created else 200

    payload, headers, status = await run_in_threadpool(run)
    return FhirResponse(payload, status_code=status, headers=headers)


@router.get("/{resource_type}/{rid}", response_class=FhirResponse)
def read(
    resource_type: str,
    rid: str,
    store: StoreDep,
    if_none_match: IfNoneMatch = None,
    who: Principal = ANY_ROLE,
) -> Response:
    if resource_type not in hosted.HOSTED_TYPES:
        raise NotFoundError(f"resource type {resource_type} is not supported here")
    _require_scope(who, resource_type, "r")
    with store.session() as s:
        row = hosted.read(s, resource_type, rid)
        _check_access(row, who, s)
        audit.record(
            s,
            "resource.read",
            who.actor,
            case_id=row.case_id,
            patient=_patient_of(row),
            entity=[f"{resource_type}/{rid}"],
        )
        headers = _headers(row)
        if if_none_match and if_none_match.strip() == _etag(row):
            return Response(status_code=304, headers={"ETag": headers["ETag"]})
        return FhirResponse(row.body, headers=headers)


@router.get("/{resource_type}", response_class=FhirResponse)
def search(
    resource_type: str,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    identifier: str | None = None,
    who: Principal = ANY_ROLE,
) -> FhirResponse:
    """Search by `identifier` (token). Other parameters are refused, not silently ignored."""
    if resource_type not in SEARCHABLE:
        raise NotFoundError(f"search on {resource_type} is not supported here")
    _require_scope(who, resource_type, "s")
    unknown = [k for k in request.query_params if k not in ("identifier", "_format")]
    if unknown:
        raise ValidationError(
            f"unsupported search parameter(s): {', '.join(sorted(unknown))}",
            expression=[f"{resource_type}?{unknown[0]}"],
            status_code=400,
        )
    if not identifier:
        raise ValidationError(
            "search needs identifier=system|value",
            expression=[f"{resource_type}?identifier"],
            status_code=400,
        )
    with store.session() as s:
        rows = hosted.find_by_identifier(
            s, resource_type, identifier, partner_id=who.partner_id if who.role == "ehr" else None
        )
        visible = []
        for row in rows:
            try:
                _check_access(row, who, s)
            except ForbiddenError:
                continue
            visible.append(row)
        audit.record(
            s, "resource.search", who.actor, entity=[f"{r.resource_type}/{r.id}" for r in visible]
        )
        base = settings.base_url
        return FhirResponse(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(visible),
                "link": [
                    {"relation": "self", "url": f"{base}/fhir/{resource_type}?{request.url.query}"}
                ],
                "entry": [
                    {
                        "fullUrl": f"{base}/fhir/{r.resource_type}/{r.id}",
                        "resource": r.body,
                        "search": {"mode": "match"},
                    }
                    for r in visible
                ],
            }
        )


@router.put("/Task/{rid}", response_class=FhirResponse, openapi_extra=FHIR_BODY)
async def update_task(
    rid: str, body: Body, store: StoreDep, if_match: IfMatch = None, who: Principal = EHR_OR_ADMIN
) -> FhirResponse:
    """The requester changes the Task's status (e.g. `cancelled` with a statusReason).

    Only `status`, `statusReason` and `businessStatus` are taken from the body; the state
    machine decides whether the move is legal (409 otherwise).
    """
    _require_scope(who, "Task", "u")
    task = validate_resource(body, allowed=frozenset({"Task"}))
    if task.get("id") not in (None, rid):
        raise ValidationError(
            "Task.id does not match the URL", expression=["Task.id"], status_code=400
        )

    def run() -> tuple[Resource, dict[str, str]]:
        with store.session() as s:
            row = hosted.read(s, "Task", rid)
            _check_access(row, who, s)
            if if_match is not None and if_match.strip() != _etag(row):
                raise PreconditionFailedError(
                    f"If-Match {if_match} does not match the current version {_etag(row)}"
                )
            if row.case_id is None:
                raise ConflictError("this Task is not a referral Task")
            new_status = task.get("status")
            if who.role == "ehr" and new_status not in (row.body.get("status"), "cancelled"):
                raise ForbiddenError("a requester may only cancel its referral Task")
            reason = (task.get("statusReason") or {}).get("text")
            if new_status != row.body.get("status"):
                tasks.transition_task(s, row, str(new_status), reason)
            if "businessStatus" in task:
                hosted.update(
                    s, row, {**copy.deepcopy(row.body), "businessStatus": task["businessStatus"]}
                )
            audit.record(
                s,
                "task.update",
                who.actor,
                case_id=row.case_id,
                patient=_patient_of(row),
                entity=[f"Task/{row.id}"],
            )
            return row.body, _headers(row)

    payload, headers = await run_in_threadpool(run)
    return FhirResponse(payload, headers=headers)
