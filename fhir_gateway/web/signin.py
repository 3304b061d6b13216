"""Signing in to the workspace: the organisation's OpenID Connect provider (authorization code
with PKCE, through authlib), or, for the demo, the dev sign-in of a named reviewer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_gateway.api.deps import SettingsDep, StoreDep
from fhir_gateway.errors import AuthError, ConfigError, ForbiddenError, UpstreamUnavailableError
from fhir_gateway.security import audit, sessions
from fhir_gateway.security.access import Principal
from fhir_gateway.security.audit import Actor
from fhir_gateway.security.auth import ROLES, TokenValidator, mint_dev_token
from fhir_gateway.settings import Settings
from fhir_gateway.web import session
from fhir_gateway.web.render import render

if TYPE_CHECKING:
    from authlib.integrations.starlette_client import OAuth

# authlib (with httpx and joserfc, ~3.5 MB of RSS) is imported on the first OIDC sign-in, not
# at start: most processes never see one (tests/unit/test_lazy_imports.py keeps it so).

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/app", include_in_schema=False)
PROVIDER = "org"


def oidc_client(request: Request, settings: Settings) -> Any:
    """The authlib client for the organisation's provider (made once per app)."""
    from authlib.integrations.starlette_client import OAuth

    oauth: OAuth | None = getattr(request.app.state, "oauth", None)
    if oauth is None:
        web = settings.web
        if not (web.oidc_issuer and web.oidc_client_id):
            raise ConfigError("web.oidc_issuer and web.oidc_client_id are not set")
        oauth = OAuth()
        oauth.register(
            PROVIDER,
            client_id=web.oidc_client_id,
            client_secret=web.oidc_client_secret,
            server_metadata_url=(f"{web.oidc_issuer.rstrip('/')}/.well-known/openid-configuration"),
            client_kwargs={"scope": web.oidc_scopes, "code_challenge_method": "S256"},
        )
        request.app.state.oauth = oauth
    return oauth.create_client(PROVIDER)


def _redirect_url(settings: Settings) -> str:
    return settings.web.oidc_redirect_url or (f"{settings.base_url}/app/auth/callback")


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_page(request: Request, settings: SettingsDep) -> Response:
    return render(
        request,
        "sign_in.html",
        {
            "oidc": bool(settings.web.oidc_issuer and settings.web.oidc_client_id),
            "dev": session.dev_sign_in_allowed(settings, request),
        },
    )


@router.get("/auth/login")
async def login(request: Request, settings: SettingsDep) -> Response:
    """Redirect to the provider (state, nonce and the PKCE verifier kept in the session)."""
    from authlib.integrations.base_client.errors import OAuthError

    client = oidc_client(request, settings)
    try:
        response: Response = await client.authorize_redirect(request, _redirect_url(settings))
    except OAuthError:
        raise
    except Exception as exc:  # the provider's discovery document could not be read
        raise _unavailable(exc) from None
    return response


def _unavailable(exc: Exception) -> UpstreamUnavailableError:
    log.warning("web.sign_in.provider_failed", error=type(exc).__name__)
    return UpstreamUnavailableError("the identity provider did not answer", system="oidc")


@router.get("/auth/callback")
async def callback(request: Request, settings: SettingsDep, store: StoreDep) -> Response:
    """The provider's answer: code -> tokens (PKCE), the ID token checked by authlib
    (signature against the provider's JWKS, issuer, audience, nonce, expiry)."""
    from authlib.integrations.base_client.errors import OAuthError

    client = oidc_client(request, settings)
    try:
        token = await client.authorize_access_token(request)
    except OAuthError as exc:
        log.warning("web.sign_in.refused", reason=exc.error)
        raise AuthError(f"the identity provider refused the sign-in ({exc.error})") from None
    except Exception as exc:  # transport or server error at the token or JWKS endpoint
        raise _unavailable(exc) from None
    claims = token.get("userinfo") or {}
    cfg = settings.auth
    role = claims.get(cfg.role_claim)
    if isinstance(role, list):
        role = next((r for r in ("admin", "reviewer") if r in role), None)
    sub = claims.get(cfg.subject_claim)
    if not isinstance(sub, str) or not sub or role not in ROLES:
        raise ForbiddenError("the identity provider's token names no workspace role")
    who = Principal(sub=sub, role=str(role))
    session.sign_in(request, who, "oidc")
    _audit_sign_in(store, who, "oidc")
    return _to_workspace(settings, who)


@router.get("/sign-in/dev", response_class=HTMLResponse)
def dev_page(
    request: Request, settings: SettingsDep, reviewer: str = "dr.demo", role: str = "reviewer"
) -> Response:
    if not session.dev_sign_in_allowed(settings, request):
        raise ForbiddenError("the dev sign-in is off (dev issuer off, or not on loopback)")
    return render(
        request,
        "dev_sign_in.html",
        {"reviewer": reviewer[:256], "role": role if role in session.WORKSPACE_ROLES else ""},
    )


@router.post("/sign-in/dev")
def dev_sign_in(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    fields: dict[str, str] = Depends(session.form),
) -> Response:
    """Mint a dev-issuer token for the named reviewer and sign in with it (loopback only)."""
    if not session.dev_sign_in_allowed(settings, request):
        raise ForbiddenError("the dev sign-in is off (dev issuer off, or not on loopback)")
    sub = fields.get("reviewer", "").strip()[:256]
    role = fields.get("role", "reviewer")
    if not sub or role not in session.WORKSPACE_ROLES:
        raise ForbiddenError("the dev sign-in needs a name and the role reviewer or admin")
    token = mint_dev_token(settings.data_dir, role=role, sub=sub, audience=settings.auth.audience)
    tokens: TokenValidator = request.app.state.tokens
    who = tokens.validate(token)
    session.sign_in(request, who, "dev")
    _audit_sign_in(store, who, "dev")
    return _to_workspace(settings, who)


@router.post("/sign-out")
def sign_out(request: Request, fields: dict[str, str] = Depends(session.form)) -> Response:
    request.session.clear()
    response = RedirectResponse("/app/sign-in", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="lax")
    return response


def _to_workspace(settings: Settings, who: Principal) -> Response:
    """To /app, with the image session cookie (`security.sessions`) that the viewer at /viewer
    reads the case's DICOMweb with: signing in to the workspace opens the images too."""
    response = RedirectResponse("/app", status_code=303)
    sessions.open_on(response, settings, who)
    return response


def _audit_sign_in(store: Any, who: Principal, via: str) -> None:
    with store.session() as s:
        audit.record(s, "user.sign_in", Actor(sub=who.sub, role=who.role), entity=[f"via:{via}"])
