"""Topic-based Subscriptions at /fhir (R4 Subscriptions Backport IG 1.1.0): create, read,
delete, `$status`, and the SubscriptionTopic published as a Basic resource."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from fhir_gateway.api.deps import ANY_ROLE, EHR_OR_ADMIN, Body, SettingsDep, StoreDep
from fhir_gateway.api.fhir import FHIR_BODY, _require_scope, json_only
from fhir_gateway.api.responses import FhirResponse
from fhir_gateway.errors import NotFoundError
from fhir_gateway.notify import bundles, subscriptions
from fhir_gateway.security.access import Principal
from fhir_gateway.settings import Settings

router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Depends(json_only)])


def _base(settings: Settings) -> str:
    return f"{settings.base_url}/fhir"


@router.get("/Basic/{rid}", response_class=FhirResponse)
def read_topic(rid: str, settings: SettingsDep, who: Principal = ANY_ROLE) -> FhirResponse:
    """The SubscriptionTopic (as Basic, IG 1.1.0 R4 topic representation); no PHI."""
    if rid != bundles.TOPIC_ID:
        raise NotFoundError(f"Basic/{rid} is not known")
    return FhirResponse(bundles.topic_resource(_base(settings)))


@router.post("/Subscription", response_class=FhirResponse, openapi_extra=FHIR_BODY)
async def create_subscription(
    body: Body, store: StoreDep, settings: SettingsDep, who: Principal = EHR_OR_ADMIN
) -> FhirResponse:
    """A partner's EHR subscribes to its referrals' Task status changes; 201, status
    `requested` until the handshake succeeds."""
    _require_scope(who, "Subscription", "c")

    def run() -> tuple[dict[str, object], str]:
        with store.session() as s:
            row = subscriptions.create(
                s, body, who, fhir_base=_base(settings), cfg=settings.notifications
            )
            return row.body, f"Subscription/{row.id}/_history/{row.version_id}"

    payload, location = await run_in_threadpool(run)
    return FhirResponse(payload, status_code=201, headers={"Location": location})


@router.get("/Subscription/{rid}/$status", response_class=FhirResponse)
def subscription_status(
    rid: str, store: StoreDep, settings: SettingsDep, who: Principal = EHR_OR_ADMIN
) -> FhirResponse:
    """`$status`: the SubscriptionStatus (query-status) with eventsSinceSubscriptionStart."""
    _require_scope(who, "Subscription", "r")
    with store.session() as s:
        return FhirResponse(subscriptions.status(s, rid, who, fhir_base=_base(settings)))


@router.get("/Subscription/{rid}", response_class=FhirResponse)
def read_subscription(rid: str, store: StoreDep, who: Principal = EHR_OR_ADMIN) -> FhirResponse:
    _require_scope(who, "Subscription", "r")
    with store.session() as s:
        return FhirResponse(subscriptions.read(s, rid, who))


@router.delete("/Subscription/{rid}", status_code=204)
def delete_subscription(rid: str, store: StoreDep, who: Principal = EHR_OR_ADMIN) -> Response:
    _require_scope(who, "Subscription", "d")
    with store.session() as s:
        subscriptions.delete(s, rid, who)
    return Response(status_code=204)
