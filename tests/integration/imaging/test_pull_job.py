"""The `pull_imaging` job run by the real job worker against a real Orthanc."""

from __future__ import annotations

import pydicom
import pytest

from fhir_gateway import job_handlers, jobs
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import Job
from tests.integration.imaging.cases import make_case, study_ref
from tests.integration.imaging.conftest import DICOM

pytestmark = pytest.mark.server

PARTNERS = """
[[partners]]
id = "st-elsewhere"
name = "St Elsewhere"
identifier = {{ system = "urn:x", value = "st-elsewhere" }}

[partners.dicomweb]
base_url = "{url}"
search_by_patient = false
"""


def test_worker_runs_pull_imaging(orthanc, gw_store, settings: Settings, tmp_path):
    partners = tmp_path / "partners.toml"
    partners.write_text(PARTNERS.format(url=orthanc.dicomweb_url), encoding="utf-8")
    cfg = settings.model_copy(update={"partners_file": partners})
    ct = sorted((DICOM / "series_77654033_CT2").glob("*.dcm"))
    study_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    case_id = make_case(gw_store, supporting_info=[study_ref(study_uid)])
    with gw_store.session() as s:
        job_id = jobs.enqueue(s, "pull_imaging", case_id=case_id).id
    job_handlers.register_all()  # as `serve` and `worker` do
    assert jobs.Worker(gw_store, cfg).run_once()
    with gw_store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.state == "done", job.last_error
        imaging = job.progress["imaging"]
    assert imaging["instances"] == len(ct)
    assert imaging["bytes"] == sum(p.stat().st_size for p in ct)
    assert imaging["rejected"] == 0
    assert imaging["rejected_parts"] == []
