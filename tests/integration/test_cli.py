"""The console commands as a user runs them: token, cases, jobs, demo; one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fhir_gateway.security.auth import TokenValidator
from fhir_gateway.settings import AuthSettings

ROOT = Path(__file__).resolve().parents[2]


def cli(
    *args: str, data_dir: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    if data_dir is not None:
        env["FHIR_GATEWAY_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "fhir_gateway.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_token_prints_the_token_alone(tmp_path) -> None:
    r = cli("token", "--role", "reviewer", "--sub", "alice", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert r.stdout == token + "\n"
    assert token.count(".") == 2
    who = TokenValidator(AuthSettings(), tmp_path).validate(token)
    assert (who.sub, who.role) == ("alice", "reviewer")


def test_bad_role_is_one_line_exit_2(tmp_path) -> None:
    r = cli("token", "--role", "root", "--sub", "x", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "unknown role" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_partners_file_is_one_line_exit_2(tmp_path) -> None:
    (tmp_path / "partners.toml").write_text("[[partners]\n")
    r = cli("serve", "--data-dir", str(tmp_path), "--port", "1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: partners file")
    assert "Traceback" not in r.stderr


def test_serve_refuses_public_bind_with_dev_issuer(tmp_path) -> None:
    r = cli("serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert "dev token issuer" in r.stderr


def test_demo_runs_the_loop_on_embedded_defaults() -> None:
    r = cli("demo", timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Task.status = received" in out
    assert "cases: 1 (no second case)" in out
    # the records of the Synthea patient in the sandbox EHR were pulled over SMART
    # 74 Synthea observations + the authored oncology supplement (3 CEA, 1 stage group)
    assert re.search(r"Observation\s+│\s+78 │", out), out
    assert re.search(r"Procedure\s+│\s+10 │", out), out
    assert "job done" in out
    assert "partial" not in out  # $everything asked only for what the token covers
    assert "pacs.indexed" not in out  # logs go to demo.log, not stdout
    assert "2 studies, 5 instances" in out  # pulled: the patient's CT and another's X-ray
    # the X-ray is another patient's: held by the identity check, out of the per-case DICOMweb
    assert "1 study held: identity mismatch (name, birthDate, sex)" in out
    assert "GET /admin/held -> 1 awaiting an admin" in out
    # the CT series, and the patient's CD uploaded through a patient link (3 instances)
    assert "dicom-web/studies -> 2 studies, 7 instances" in out
    assert "patient CD over tus through the link: 3 received, 1 ignored (DICOMDIR)" in out
    assert "the CD's with [3] instances" in out
    assert "Dog" not in out  # the other patient's name is never shown
    assert re.search(r"imaging\s+│\s+yes", out), out
    assert "1 Patient" in out  # the normalised case bundle
    # the case a specialist needs: primary cancer, CEA in one unit, timeline, completeness
    assert "primary cancer condition: Primary malignant neoplasm of colon" in out
    assert "mCODE PrimaryCancerCondition" in out
    assert re.search(r"2017-06-20 │ 4.1 ng/mL │ 4.1 ug/L\s+│ TumorMarkerTest", out), out
    assert re.search(r"GET /cases/\{id\}/timeline: \d+ events", out), out
    assert re.search(r"cea\s+│\s+yes │\s+3 │", out), out
    assert re.search(r"kras_nras_braf\s+│\s+missing │", out), out
    assert "accession S17-0412; block S17-0412-A1, slide S17-0412-A1-1" in out
    assert "audit chain verified" in out
    scraped = re.search(r"GET /metrics \(Prometheus\): (.*)", out)
    assert scraped is not None, out
    found = re.findall(r"([A-Za-z /]+?) (\d+)(?:,|$)", scraped.group(1))
    counts = {name.strip(): int(value) for name, value in found}
    for counter in ("jobs run", "FHIR resources pulled", "DICOM instances pulled"):
        assert counts[counter] > 0, (counter, scraped.group(1))
    assert counts["reports delivered"] > 0  # to each recipient, and again when amended
    # the second opinion reached the sandbox EHR once and the referral Task is closed
    assert "delivered after 1 attempt(s), HTTP 201" in out
    assert re.search(r"referral Task .*\n?.*completed", out), out
    assert "all servers stopped cleanly" in out


def test_cases_and_jobs_tables(tmp_path) -> None:
    import json

    from fhir_gateway.intake import referrals
    from fhir_gateway.security.access import Principal
    from fhir_gateway.settings import load_partners
    from fhir_gateway.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    bundle = json.loads((ROOT / "fixtures/referrals/referral-transaction.json").read_text())
    result = referrals.intake_transaction(
        store,
        bundle,
        Principal("e", "ehr", "st-elsewhere"),
        load_partners(ROOT / "fixtures/partners/partners.toml"),
    )
    store.dispose()
    r = cli("cases", data_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert result.case_id is not None
    assert result.case_id in r.stdout
    assert "received" in r.stdout
    assert "pull_fhir:queued" in r.stdout
    r = cli("jobs", "--state", "queued", data_dir=tmp_path)
    assert r.stdout.count("queued") == 2


def test_map_maps_good_files_and_names_bad_ones(tmp_path) -> None:
    out = tmp_path / "bundle.json"
    r = cli(
        "map",
        str(ROOT / "fixtures/hl7v2/LAB-ORU-1.hl7"),
        str(ROOT / "fixtures/bad/fhir/json-comma-bad-1.json"),
        "--out",
        str(out),
    )
    assert r.returncode == 2
    bad_lines = [line for line in r.stderr.splitlines() if "json-comma-bad-1.json" in line]
    assert len(bad_lines) == 1
    assert "not well-formed JSON" in bad_lines[0]
    import json

    bundle = json.loads(out.read_text())
    assert bundle["type"] == "collection"
    assert any(e["resource"]["resourceType"] == "Observation" for e in bundle["entry"])
    ok = cli("map", str(ROOT / "fixtures/hl7v2/LAB-ORU-1.hl7"), "--out", str(out))
    assert ok.returncode == 0, ok.stderr


# One fixture of every kind `fhir-gateway map` claims, and what each must yield.
MAP_KINDS = {
    "fhir-json": ("fixtures/synthea/colon_Darin_Skiles.json", "Condition"),
    "ndjson": ("fixtures/fhir/10pt_Patient.000.ndjson", "Patient"),
    "ccda": ("fixtures/ccda/C-CDA_R2-1_CCD.xml", "Condition"),
    "hl7v2": ("fixtures/hl7v2/ORU-R01-01.hl7", "Observation"),
    "dicom-part10": ("fixtures/dicom/ct/CT_small.dcm", "ImagingStudy"),
    "dicom-json": ("fixtures/dicom/test1.json", "ImagingStudy"),
}


@pytest.mark.parametrize("kind", sorted(MAP_KINDS))
def test_map_cli_maps_every_kind_it_claims(kind: str, tmp_path: Path) -> None:
    """`fhir-gateway map FILE --out b.json` exits 0 with the resources of that kind of source."""
    path, expected_type = MAP_KINDS[kind]
    out = tmp_path / "b.json"
    r = cli("map", path, "--out", str(out))
    assert r.returncode == 0, r.stderr
    bundle = json.loads(out.read_text())
    types = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert expected_type in types, (kind, sorted(types))
    assert "Patient" in types


def test_held_list_release_and_reject(tmp_path) -> None:
    """`fhir-gateway held list|release|reject`: field names only, decisions audited, a second
    decision is a one-line error."""
    import pydicom

    from fhir_gateway.casebundle import held
    from fhir_gateway.store import open_store
    from fhir_gateway.store.models import AuditRow
    from tests.integration.imaging.cases import make_case

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    case_id = make_case(
        store, "case-cli", patient={"name": [{"family": "Skiles", "given": ["Darin"]}]}
    )
    header = pydicom.dcmread(
        ROOT / "fixtures/dicom/series_98892003_MR1/4919.dcm", stop_before_pixels=True
    )
    other = pydicom.dcmread(ROOT / "fixtures/dicom/ct/CT_small.dcm", stop_before_pixels=True)
    assert held.check_studies(store, case_id, "pacs", {"1.2.3": [header], "1.2.4": [other]}) == 2
    with store.session() as s:
        first, second = (i.id for i in held.list_items(s, case_id))
    store.dispose()
    r = cli("held", "list", data_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert first in r.stdout
    assert "ImagingStudy urn:oid:1.2.3" in r.stdout
    assert "name" in r.stdout
    assert "Doe" not in r.stdout
    assert "Peter" not in r.stdout
    r = cli("held", "release", first, data_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "released" in r.stdout
    r = cli("held", "reject", second, data_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("held", "reject", first, data_dir=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: this held item was already decided: it is released"
    r = cli("held", "list", data_dir=tmp_path)
    assert first not in r.stdout
    assert second not in r.stdout
    r = cli("held", "list", "--state", "all", data_dir=tmp_path)
    assert first in r.stdout
    assert second in r.stdout
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    with store.session() as s:
        actions = [
            (row.action, row.agent.startswith("cli:"))
            for row in s.query(AuditRow).order_by(AuditRow.id)
            if row.action.startswith("identity")
        ]
    store.dispose()
    assert actions == [
        ("identity.hold", False),
        ("identity.hold", False),
        ("identity.release", True),
        ("identity.reject", True),
    ]
