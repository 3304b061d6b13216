"""The patient upload page in headless Chromium (Playwright driving Debian's /usr/bin/chromium):
an admin's link opened without signing in; a 200-instance CD folder (with its DICOMDIR) chosen
with the folder picker, a PDF and a refused file; the page lists 201 received and the refusal's
reason; the case then has the ImagingStudy of 200 instances and the PDF's DocumentReference.

Real components: the gateway on loopback (uvicorn, one job worker), SQLite, the file image
store, the vendored tus-js-client in the page.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from fhir_gateway.app import create_app
from fhir_gateway.casebundle import normalise
from fhir_gateway.sandbox.server import AppServer, free_port
from fhir_gateway.settings import JobSettings, Settings
from fhir_gateway.store import open_store
from fhir_gateway.store.models import CaseDocument, StoredResource
from tests.api.test_documents import CCD_MRN, TEXT_PDF
from tests.conftest import FHIR_JSON, Tokens, load_fixture
from tests.upload_link_helpers import make_cd
from tests.web.test_browser import axe_serious

pytestmark = pytest.mark.browser
INSTANCES = 200
SHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshots" / "upload-link.png"


@pytest.fixture
def gateway(data_dir: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = Settings(
        data_dir=data_dir,
        log_format="console",
        public_base_url=base,
        jobs=JobSettings(lease_s=5, poll_s=0.1, backoff_base_s=0.1, backoff_cap_s=0.5),
    )
    store = open_store(settings.db_url, key_dir=settings.data_dir / "keys")
    app = create_app(settings, store=store, workers=1, configure_logs=False)
    with AppServer(app, port, lifespan=True):
        yield {"base": base, "settings": settings, "store": store}
    store.dispose()


def _referral(base: str, tokens: Tokens) -> str:
    bundle = load_fixture("referrals/referral-transaction.json")
    for entry in bundle["entry"]:
        r = entry["resource"]
        if r["resourceType"] == "Patient":
            r["identifier"] = [CCD_MRN]
            r["name"] = [{"family": "Jones", "given": ["Isabella"]}]
            r["gender"], r["birthDate"] = "female", "1950-12-19"
    resp = requests.post(f"{base}/fhir", json=bundle, headers=tokens.headers("ehr") | FHIR_JSON)
    assert resp.status_code == 200, resp.text
    cases = requests.get(f"{base}/cases", headers=tokens.headers("admin")).json()
    return str(cases[0]["id"])


def _wait(what: Any, timeout_s: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.2)
    return what()


def test_patient_uploads_a_cd_folder_and_a_pdf_through_the_link(
    browser: Any, gateway: dict[str, Any], tmp_path: Path
) -> None:
    base, settings, store = gateway["base"], gateway["settings"], gateway["store"]
    tokens = Tokens(settings.data_dir)
    case_id = _referral(base, tokens)
    link = requests.post(f"{base}/cases/{case_id}/upload-links", headers=tokens.headers("admin"))
    assert link.status_code == 201, link.text
    url = link.json()["url"]
    cd = tmp_path / "CD"
    make_cd(cd, INSTANCES)
    loose = tmp_path / "loose"
    loose.mkdir()
    pdf = loose / "pathology-report.pdf"
    pdf.write_bytes(TEXT_PDF.read_bytes())
    exe = loose / "viewer.exe"
    exe.write_bytes(b"MZ\x90\x00" + bytes(range(256)) * 4)

    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    assert page.get_by_role("heading", level=1).inner_text() == "Send your records"
    assert axe_serious(page) == []
    page.locator("#pick-folder").set_input_files(cd)
    page.locator("#pick-files").set_input_files([pdf, exe])
    summary = page.locator("#summary")
    page.wait_for_function(
        "() => document.getElementById('summary').dataset.pending === '0'"
        " && document.querySelectorAll('#files li').length === 203",
        timeout=60_000,
    )
    assert summary.get_attribute("data-accepted") == str(INSTANCES + 1)
    assert summary.get_attribute("data-rejected") == "1"
    assert summary.inner_text().startswith(f"{INSTANCES + 1} received, 1 refused")
    refused = page.locator('#files li[data-result="rejected"]')
    assert refused.count() == 1
    assert "viewer.exe" in refused.inner_text()
    assert "refused: " in refused.inner_text()
    reason = refused.locator(".state").inner_text().removeprefix("refused: ")
    assert len(reason) > 10
    ignored = page.locator('#files li[data-result="ignored"]')
    assert "DICOMDIR" in ignored.inner_text()
    assert page.locator("#files progress").count() == 203
    assert axe_serious(page) == []
    page.set_viewport_size({"width": 1000, "height": 700})
    page.screenshot(path=str(SHOT), full_page=False)
    context.close()

    def study() -> list[dict[str, Any]]:
        with store.session(readonly=True) as s:
            return [
                r.body
                for r in s.scalars(
                    select(StoredResource).where(
                        StoredResource.case_id == case_id,
                        StoredResource.resource_type == "ImagingStudy",
                    )
                )
                if r.body.get("numberOfInstances") == INSTANCES
            ]

    (imaging,) = _wait(study)
    assert imaging["numberOfInstances"] == INSTANCES
    with store.session(readonly=True) as s:
        docs = s.scalars(select(CaseDocument).where(CaseDocument.case_id == case_id)).all()
    assert [d.kind for d in docs] == ["pdf"]
    # the case bundle (normalised as the job does; the referral's pulls have no EHR here)
    normalise.normalise_case(store, settings, case_id)
    bundle = requests.get(f"{base}/cases/{case_id}/bundle", headers=tokens.headers("admin"))
    assert bundle.status_code == 200
    resources = [e["resource"] for e in bundle.json()["entry"]]
    studies = [r for r in resources if r["resourceType"] == "ImagingStudy"]
    assert [s["numberOfInstances"] for s in studies] == [INSTANCES]
    assert any(r["resourceType"] == "DocumentReference" for r in resources)
