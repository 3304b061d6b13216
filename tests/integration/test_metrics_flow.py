"""`/metrics` after real work: a referral pulled over SMART from the sandbox EHR, a study pulled
over DICOMweb from the sandbox PACS, a report delivered into the EHR. The counters and the job
gauges move by what happened (measured as the difference of two scrapes: counters are per
process and other tests in the session add to them)."""

from __future__ import annotations

import pydicom
import requests

from connectors.dicomweb import DicomwebClient
from fhir_gateway.imaging.retrieval import pull_case_images, study_selectors_for_case
from fhir_gateway.imaging.store import FileImageStore
from fhir_gateway.sandbox.pacs import PacsServer
from tests.api.test_ops import Samples, samples
from tests.conftest import FIXTURES
from tests.integration.imaging.cases import make_case, study_ref
from tests.integration.test_report_delivery_sandbox import (  # fixtures used by name below
    Flow,
    app_client,
    ehr,
)

__all__ = ["app_client", "ehr"]  # imported fixtures
CT_SMALL = FIXTURES / "dicom" / "ct" / "CT_small.dcm"


def value(scrape: Samples, name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def test_counters_and_gauges_after_a_pull_and_a_delivery(
    app_client, tokens, settings, ehr, tmp_path
) -> None:
    flow = Flow(app_client, tokens, settings, ehr)

    def scrape() -> Samples:
        resp = app_client.get("/metrics", headers=flow.admin())
        assert resp.status_code == 200, resp.text
        return samples(resp.text)

    before = scrape()
    case_id = flow.refer_and_pull()
    flow.put_report(case_id)
    flow.submit(case_id)
    flow.run_jobs()
    assert [d["status"] for d in flow.deliveries(case_id)] == ["delivered"]

    study = str(pydicom.dcmread(CT_SMALL, stop_before_pixels=True).StudyInstanceUID)
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    (pacs_dir / "ct.dcm").write_bytes(CT_SMALL.read_bytes())
    img_case = make_case(flow.store, "img-case", supporting_info=[study_ref(study)])
    with PacsServer(pacs_dir) as pacs, requests.Session() as http:
        counts = pull_case_images(
            flow.store,
            img_case,
            DicomwebClient(http, pacs.base_url),
            FileImageStore(flow.store, settings.data_dir),
            study_selectors_for_case(flow.store, img_case, None),
        )
    assert counts.instances == 1
    after = scrape()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    pulled = next(
        j
        for j in flow.client.get(f"/cases/{case_id}", headers=flow.admin()).json()["jobs"]
        if j["kind"] == "pull_fhir"
    )
    assert grew("fhir_gateway_pull_resources_total") == sum(
        pulled["progress"]["summary"]["counts"].values()
    )
    assert grew("fhir_gateway_pull_instances_total") == 1
    assert grew("fhir_gateway_pull_bytes_total", kind="images") == CT_SMALL.stat().st_size
    assert grew("fhir_gateway_deliveries_total", outcome="delivered") == 1
    assert grew("fhir_gateway_deliveries_total", outcome="dead") == 0
    for kind in ("pull_fhir", "deliver_report"):
        assert grew("fhir_gateway_job_duration_seconds_count", kind=kind, outcome="done") == 1
        # gauges come from the database at scrape time (this test's own database)
        assert value(after, "fhir_gateway_jobs", kind=kind, state="done") == 1
    assert value(after, "fhir_gateway_queue_depth") == value(
        after, "fhir_gateway_jobs", kind="normalise_case", state="queued"
    )
    http_posts = grew(
        "fhir_gateway_http_requests_total", method="POST", route="/fhir", status="200"
    )
    assert http_posts == 1
    assert case_id not in str(after)  # route templates, never raw paths
