"""FHIR R4 endpoint for referring EHRs at /fhir: metadata, transaction, create, read, search,
and Task status updates."""

from __future__ import annotations

import copy
from typing import Annotated, Any
from urllib.parse import urlencode

import anyio.to_thread
from anyio import CapacityLimiter
from anyio.lowlevel import RunVar
from fastapi import APIRouter, Depends, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from fhir_gateway.api.deps import (
    ANY_ROLE,
    EHR_OR_ADMIN,
    Body,
    SettingsDep,
    StoreDep,
    fhir_json_body,
    get_principal,
    require_role,
)
from fhir_gateway.api.responses import FhirResponse
from fhir_gateway.errors import (
    ConflictError,
    ForbiddenError,
    NotAcceptableError,
    NotFoundError,
    PreconditionFailedError,
    ValidationError,
)
from fhir_gateway.intake import hosted, referrals, tasks
from fhir_gateway.intake.validation import validate_resource
from fhir_gateway.notify import bundles
from fhir_gateway.resources import Resource
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.security.smart_server import permits
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store
from fhir_gateway.store.models import FhirResource

JSON_FORMATS = frozenset(
    {"json", "application/json", "application/fhir+json", "application/json+fhir"}
)
JSON_ACCEPT = JSON_FORMATS | {"*/*", "application/*"}


async def json_only(request: Request) -> None:
    """FHIR JSON is all we speak (RS-01): `_format` may override `Accept`; asking for XML (or
    anything else) alone is 406 with an OperationOutcome, never XML-shaped JSON. (`async`: a
    plain `def` dependency costs every /fhir request a worker-thread hop.)"""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.split(";", 1)[0].strip().lower() not in JSON_FORMATS:
            raise NotAcceptableError(f"_format={fmt} is not served here: JSON only")
        return
    accept = request.headers.get("accept", "")
    offered = [t.split(";", 1)[0].strip().lower() for t in accept.split(",") if t.strip()]
    if offered and not any(t in JSON_ACCEPT for t in offered):
        raise NotAcceptableError("this endpoint serves application/fhir+json only")


router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Depends(json_only)])

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


def _etag(row: FhirResource | referrals.EntryOutcome) -> str:
    return f'W/"{row.version_id}"'


def _headers(row: FhirResource | referrals.EntryOutcome) -> dict[str, str]:
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
            out["searchParam"] = [
                {"name": "identifier", "type": "token"},
                {"name": "_id", "type": "token"},
            ]
        return out

    resources = [
        res("Task", ["read", "create", "update", "search-type"], True),
        res("ServiceRequest", ["read", "create", "search-type"], True),
        res("Patient", ["read", "create", "search-type"], True),
    ] + [res(t, ["read", "create"], False) for t in sorted(hosted.HOSTED_TYPES - set(SEARCHABLE))]
    base = f"{settings.base_url}/fhir"
    subscription = res("Subscription", ["create", "read", "delete"], False)
    subscription["conditionalCreate"] = False
    subscription["supportedProfile"] = [bundles.SUBSCRIPTION_PROFILE]
    subscription["extension"] = [
        {"url": bundles.TOPIC_CANONICAL_EXT, "valueCanonical": bundles.topic_url(base)}
    ]
    subscription["operation"] = [
        {
            "name": "$status",
            "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status",
        }
    ]
    resources += [
        subscription,
        res("Communication", ["create", "read"], False),
        {**res("Basic", ["read"], False), "conditionalCreate": False},
    ]
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
                    "cors": bool(settings.cors.allow_origins),
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


# The busiest route, in a router of its own (included first, no router dependencies): its
# checks are called in order below rather than resolved by FastAPI's dependency machinery,
# which cost more Python per referral than the checks themselves (~5% of a referral's
# instructions, callgrind). The same checks as every /fhir route: JSON only (RS-01), a bearer
# token, the role, then the body (content type, size, strict JSON).
transaction_router = APIRouter(prefix="/fhir", tags=["fhir"])
TRANSACTION_ROLES = ("ehr", "admin")


# Also at "/fhir/": clients that post to the base with its slash (fhirclient, fhirpy's
# execute("/")) get the transaction, not a 307 redirect that drops the body on some stacks.
@transaction_router.post("", response_class=FhirResponse, openapi_extra=FHIR_BODY)
@transaction_router.post("/", response_class=FhirResponse, include_in_schema=False)
async def transaction(request: Request) -> FhirResponse:
    """POST a referral transaction Bundle (RS-30); answered with a transaction-response."""
    await json_only(request)
    who = require_role(await get_principal(request), TRANSACTION_ROLES)
    bundle = await fhir_json_body(request, who)
    store: Store = request.app.state.store
    settings: Settings = request.app.state.settings

    for entry in bundle.get("entry") or [] if isinstance(bundle, dict) else []:
        rtype = (
            (entry.get("resource") or {}).get("resourceType") if isinstance(entry, dict) else None
        )
        if isinstance(rtype, str):
            _require_scope(who, rtype, "c")  # authorised per inner request (RS-32)

    def run() -> Resource:
        result = referrals.intake_transaction(
            store, bundle, who, settings.partners, _intake_options(settings)
        )
        return _transaction_response(result)

    limiter = _intake_threads() if store.engine.dialect.name == "sqlite" else None
    return FhirResponse(await anyio.to_thread.run_sync(run, limiter=limiter))


# On SQLite, referral transactions run in one worker thread per process; the rest wait on the
# event loop (cheaply). SQLite takes one writer at a time anyway, and a second thread only adds
# GIL handoffs and, taking turns on pooled connections, drops each one's page cache (SQLite
# discards it when another connection has committed): with one thread and the pool handing
# back the last-used connection (`store.db`), pages read per referral 87-93 -> 6-12 calls at 0
# stored and 183-190 -> 71-73 at 1,000,000 (bench_intake), and server CPU per referral lower in
# 18 of 21 alternating runs of the two. On PostgreSQL a transaction mostly waits on round
# trips: capped at 2 the rate halved, at 3 the rate at 1M stored fell (README, "Speed"), so
# there it takes the default pool.
INTAKE_THREADS = 1
_LIMITER: RunVar[CapacityLimiter] = RunVar("intake_threads")  # one per event loop


def _intake_threads() -> CapacityLimiter:
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = CapacityLimiter(INTAKE_THREADS)
        _LIMITER.set(limiter)
        return limiter


def _intake_options(settings: Settings) -> referrals.IntakeOptions:
    return referrals.IntakeOptions(
        our_org=_our_org(settings),
        our_base=settings.base_url,
        max_entries=settings.limits.max_transaction_entries,
    )


def _transaction_response(result: referrals.IntakeResult) -> Resource:
    entries = []
    for out in result.entries:
        row = out
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
    request: Request,
    body: Body,
    store: StoreDep,
    settings: SettingsDep,
    if_none_exist: IfNoneExist = None,
    who: Principal = EHR_OR_ADMIN,
) -> FhirResponse:
    """Create one resource, with conditional create (RS-05: 0 -> 201, 1 -> 200, >1 -> 412).

    Criteria in the query string (`POST /fhir/Patient?identifier=...`, as fhirpy sends them)
    are conditional create too, exactly like `If-None-Exist`.
    """
    if resource_type not in hosted.HOSTED_TYPES:
        raise NotFoundError(f"resource type {resource_type} is not supported here")
    _require_scope(who, resource_type, "c")
    if not isinstance(body, dict) or body.get("resourceType") != resource_type:
        raise ValidationError(
            f"body must be a {resource_type} resource", expression=[resource_type], status_code=400
        )
    query = "&".join(f"{k}={v}" for k, v in request.query_params.multi_items() if k != "_format")
    if query:
        if if_none_exist is not None and if_none_exist.split("?", 1)[-1] != query:
            raise ValidationError(
                "the query string and If-None-Exist carry different criteria; send one",
                expression=[f"{resource_type}?"],
                status_code=400,
            )
        if_none_exist = query

    def run() -> tuple[Resource, dict[str, str], int]:
        result = referrals.intake_single(
            store, body, who, settings.partners, if_none_exist, _intake_options(settings)
        )
        out = result.entries[0]
        return out.body or {}, _headers(out), 201 if out.created else 200

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
    with store.session(readonly=True) as s:  # no write lock while reading
        row = hosted.read(s, resource_type, rid)
        _check_access(row, who, s)
    with store.session() as s:  # audited before anything is answered
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


# Search result parameters we honour (R4 search.html 3.1.1.5 ff.). `_total` asks for a total:
# ours is always exact. `_totalMethod` is what fhirpy's `.count()` sends (an Aidbox parameter),
# with `_count=0`: the exact total is the answer to that too. `_offset` is in our own next links.
RESULT_PARAMS = ("_count", "_summary", "_format", "_total", "_totalMethod", "_offset")
SEARCH_PARAMS = ("identifier", "_id")
DEFAULT_PAGE, MAX_PAGE = 100, 1000


def _nonnegative(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ValidationError(
            f"{name} must be a non-negative integer", expression=[name], status_code=400
        )
    return int(raw)


@router.get("/{resource_type}", response_class=FhirResponse)
def search(
    resource_type: str,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    who: Principal = ANY_ROLE,
) -> FhirResponse:
    """Search by `identifier` (token) and/or `_id`, with `_count`, `_summary=count` and a
    `Bundle.total` (RS-21). Other parameters are refused, not silently ignored."""
    if resource_type not in SEARCHABLE:
        raise NotFoundError(f"search on {resource_type} is not supported here")
    _require_scope(who, resource_type, "s")
    params = request.query_params
    unknown = sorted({k for k in params if k not in SEARCH_PARAMS + RESULT_PARAMS})
    if unknown:
        raise ValidationError(
            f"unsupported search parameter(s): {', '.join(unknown)}",
            expression=[f"{resource_type}?{unknown[0]}"],
            status_code=400,
        )
    identifier, ids = params.get("identifier"), params.get("_id")
    if not identifier and not ids:
        raise ValidationError(
            "search needs identifier=system|value or _id",
            expression=[f"{resource_type}?identifier"],
            status_code=400,
        )
    summary = params.get("_summary", "false")
    if summary not in ("count", "false"):
        raise ValidationError(
            f"_summary={summary} is not supported (only count and false)",
            expression=["_summary"],
            status_code=400,
        )
    count = min(_nonnegative(request, "_count", DEFAULT_PAGE), MAX_PAGE)
    offset = _nonnegative(request, "_offset", 0)
    if summary == "count":
        count = 0
    partner = who.partner_id if who.role == "ehr" else None
    with store.session(readonly=True) as s:  # no write lock while reading
        found: dict[str, FhirResource] | None = None
        if identifier:
            rows = hosted.find_by_identifier(s, resource_type, identifier, partner_id=partner)
            found = {r.id: r for r in rows}
        if ids:
            wanted = [i for i in ids.split(",") if i]
            by_id = {
                r.id: r for r in hosted.find_by_ids(s, resource_type, wanted, partner_id=partner)
            }
            found = by_id if found is None else {k: v for k, v in found.items() if k in by_id}
        visible = []
        for row in sorted((found or {}).values(), key=lambda r: (r.last_updated, r.id)):
            try:
                _check_access(row, who, s)
            except ForbiddenError:
                continue
            visible.append(row)
    page = visible[offset : offset + count]
    with store.session() as s:  # audited before anything is answered
        audit.record(
            s, "resource.search", who.actor, entity=[f"{r.resource_type}/{r.id}" for r in page]
        )
    base = f"{settings.base_url}/fhir"
    query = [(k, v) for k, v in params.multi_items() if k != "_offset"]
    links = [{"relation": "self", "url": f"{base}/{resource_type}?{request.url.query}"}]
    if count and offset + count < len(visible):
        nxt = urlencode([*query, ("_offset", str(offset + count))])
        links.append({"relation": "next", "url": f"{base}/{resource_type}?{nxt}"})
    bundle: Resource = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(visible),
        "link": links,
    }
    if page:
        bundle["entry"] = [
            {
                "fullUrl": f"{base}/{r.resource_type}/{r.id}",
                "resource": r.body,
                "search": {"mode": "match"},
            }
            for r in page
        ]
    return FhirResponse(bundle)


@router.put("/Task/{rid}", response_class=FhirResponse, openapi_extra=FHIR_BODY)
async def update_task(
    rid: str,
    body: Body,
    store: StoreDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
    who: Principal = EHR_OR_ADMIN,
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
                partner = settings.partners.by_id(row.partner_id) if row.partner_id else None
                tasks.transition_task(s, row, str(new_status), reason, partner=partner)
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
