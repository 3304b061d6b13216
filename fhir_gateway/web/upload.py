"""The patient upload page (`/upload/{token}`): no sign-in, the link is the credential. It
shows nothing of the case: a drop zone for files or a CD folder, a progress bar per file, and
what was received and refused and why. Files go to the tus server with the token in the
`Upload-Link` header (tus-js-client, vendored); the access log carries the route template only.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from fhir_gateway.api.deps import StoreDep
from fhir_gateway.errors import NotFoundError
from fhir_gateway.records import upload_links
from fhir_gateway.web.render import templates

router = APIRouter(tags=["upload-links"])
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
}
TUS_CLIENT = "vendor/tus-js-client-4.3.1.min.js"


@router.get(upload_links.PATH + "/{token}", response_class=HTMLResponse)
def upload_page(token: str, request: Request, store: StoreDep) -> Response:
    """The page the patient opens: drop files or a CD folder; each file's progress and result."""
    try:
        link = upload_links.resolve(store, token, "page")
    except NotFoundError as exc:  # GoneError too: a page, not an OperationOutcome
        return templates().TemplateResponse(
            request,
            "upload_refused.html",
            {"status": exc.status_code, "message": exc.message},
            status_code=exc.status_code,
            headers=PAGE_HEADERS,
        )
    upload_links.record_use(store, link, "upload-link.open")
    context = {
        "token": token,
        "case_id": link.case_id,
        "expires": link.expires_at.strftime("%d %B %Y"),
        "header": upload_links.HEADER,
        "tus_client": TUS_CLIENT,
    }
    return templates().TemplateResponse(request, "upload.html", context, headers=PAGE_HEADERS)
