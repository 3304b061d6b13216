"""The reviewer workspace in headless Chromium (Playwright driving Debian's /usr/bin/chromium):
sign-in through a real OpenID Connect provider on loopback (oidc-provider-mock, authorization
code + PKCE), the case list, the case page (one chart point per marker result, the PDF inline),
the report edited with a validation error shown beside its field, fixed, submitted and shown
"delivered" (the sandbox EHR is the destination), axe-core on every page, screenshots kept in
docs/screenshots/."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_gateway.app import create_app
from fhir_gateway.sandbox import SandboxConfig, SandboxServer
from fhir_gateway.sandbox.server import AppServer, free_port
from fhir_gateway.settings import JobSettings, WebSettings
from fhir_gateway.store import open_store
from tests.report_helpers import draft_data, report_settings
from tests.web.workspace_case import PDF_TEXT, build_case, demo_resources, markers

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
AXE = ROOT / "fixtures" / "web" / "axe-core" / "axe.min.js"
SHOTS = ROOT / "docs" / "screenshots"
REVIEWER = "dr.oidc"


def _need_chromium() -> None:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        if os.environ.get("FHIR_GATEWAY_REQUIRE_SERVERS") == "1":
            pytest.fail("chromium (/usr/bin/chromium) is missing")
        pytest.skip("chromium (/usr/bin/chromium) is missing")


@pytest.fixture
def browser() -> Iterator[Any]:
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def idp() -> Iterator[str]:
    from oidc_provider_mock import User, run_server_in_thread

    with run_server_in_thread(
        user_claims=[User(sub=REVIEWER, claims={"role": "reviewer", "name": "Dr OIDC"})]
    ) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
def gateway(tmp_path: Path, idp: str) -> Iterator[dict[str, Any]]:
    with SandboxServer(SandboxConfig(data_dir=None, require_auth=False)) as ehr:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        settings = report_settings(tmp_path, ehr.base_url).model_copy(
            update={
                "public_base_url": base,
                "jobs": JobSettings(lease_s=5, poll_s=0.1, backoff_base_s=0.1, backoff_cap_s=0.5),
                "web": WebSettings(
                    oidc_issuer=idp, oidc_client_id="fhir-gateway", oidc_client_secret="s3cret"
                ),
            }
        )
        store = open_store(settings.db_url, key_dir=tmp_path / "keys")
        case_id = build_case(store, settings, REVIEWER)
        app = create_app(settings, store=store, workers=1, configure_logs=False)
        with AppServer(app, port, lifespan=True):
            yield {"base": base, "case": case_id, "ehr": ehr}
        store.dispose()


def axe_serious(page: Any) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document)")
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_reviewer_signs_in_reads_the_case_and_delivers_the_report(browser, gateway):
    base, case_id = gateway["base"], gateway["case"]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    authorize_urls: list[str] = []
    page.on("request", lambda r: authorize_urls.append(r.url) if "/authorize" in r.url else None)

    # Sign in through the organisation's provider (authorization code + PKCE).
    page.goto(f"{base}/app")
    assert page.url == f"{base}/app/sign-in"
    assert axe_serious(page) == []
    shot(page, "sign-in")
    page.get_by_role("link", name="Sign in with your organisation's account").click()
    page.get_by_role("button", name=REVIEWER).click()
    page.wait_for_url(f"{base}/app")
    assert any("code_challenge_method=S256" in u for u in authorize_urls), authorize_urls
    cookie = next(c for c in context.cookies() if c["name"] == "fhir_gateway_session")
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Lax"

    # My cases: the demo-like case, with its completeness and question.
    assert page.get_by_role("heading", level=1).inner_text() == "My cases"
    assert page.get_by_role("link", name=case_id[:8]).is_visible()
    assert axe_serious(page) == []
    shot(page, "cases")

    # The case: one chart point per CEA result, the PDF inline.
    page.get_by_role("link", name=case_id[:8]).click()
    page.wait_for_url(f"{base}/app/cases/{case_id}")
    chart = page.locator('figure[data-marker="CEA"]')
    assert chart.locator("circle[data-point]").count() == markers(demo_resources()) == 3
    # The EHR's DocumentReference (inline data) and the gateway's copy of the document (served
    # from /cases/{id}/documents/{doc}/content): each opens inline as a PDF.
    pdfs = page.locator('object[type="application/pdf"]')
    assert pdfs.count() >= 1
    for i in range(pdfs.count()):
        head = page.evaluate(
            "async (u) => { const b = await (await fetch(u)).arrayBuffer();"
            " return new TextDecoder().decode(b.slice(0, 5)); }",
            pdfs.nth(i).get_attribute("data"),
        )
        assert head == "%PDF-"
    assert page.get_by_role("heading", name="Timeline").is_visible()
    assert axe_serious(page) == []
    shot(page, "case")
    assert PDF_TEXT  # the PDF's text is checked by the mapper tests; here: it is a PDF, inline

    # The report: a bad NPI comes back beside its field, is fixed, saved, submitted, delivered.
    page.goto(f"{base}/app/cases/{case_id}/report")
    data = draft_data()
    page.get_by_label("Conclusion", exact=True).fill(data["conclusion"])
    page.get_by_label("Conclusion codes").fill("408643008 Infiltrating duct carcinoma of breast")
    page.get_by_label("Recommendations").fill("\n".join(data["recommendations"]))
    page.get_by_label("Findings").fill(json.dumps(data["findings"]))
    page.get_by_label("Family name").fill("Zolc")
    page.get_by_label("Given names").fill("Lukasz")
    page.get_by_label("NPI").fill("1234567890")  # wrong check digit
    page.get_by_role("button", name="Save draft").click()
    error = page.locator("#f-reviewer-npi-error")
    assert "not a valid NPI" in error.inner_text()
    assert page.get_by_label("NPI").get_attribute("aria-invalid") == "true"
    assert axe_serious(page) == []
    shot(page, "report-error")
    page.get_by_label("NPI").fill("1234567893")
    page.get_by_role("button", name="Save draft").click()
    assert page.get_by_role("status").inner_text() == "Draft saved."
    page.get_by_role("button", name="Submit the report").click()
    page.locator('[data-delivery-status="delivered"]').wait_for(timeout=30_000)
    assert page.locator('[data-delivery-status="delivered"]').inner_text() == "delivered"
    assert axe_serious(page) == []
    shot(page, "report")
    context.close()


def test_admin_page_through_the_dev_sign_in(browser, gateway):
    base = gateway["base"]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{base}/app/sign-in/dev?reviewer=demo-operator&role=admin")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/app")
    page.get_by_role("link", name="Admin").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Admin"
    page.get_by_label("Reviewer (token subject)").fill("dr.second")
    page.get_by_role("button", name="Assign").click()
    assert "dr.second" in page.locator("table").first.inner_text()
    assert axe_serious(page) == []
    shot(page, "admin")
    context.close()
