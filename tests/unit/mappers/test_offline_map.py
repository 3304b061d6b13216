"""`fhir-gateway map` logic: well-formed files mapped, one-line failure per unusable file."""

from __future__ import annotations

from pathlib import Path

from fhir.resources.R4B.bundle import Bundle

from fhir_gateway.offline_map import format_issue, map_files, write_bundle
from tests.unit.mappers._helpers import FIXTURES


def test_map_files_maps_good_files_and_reports_bad_ones(tmp_path: Path) -> None:
    good = [FIXTURES / "hl7v2" / "LAB-ORU-1.hl7", FIXTURES / "ccda" / "CCD_2.xml"]
    bad = FIXTURES / "bad" / "fhir" / "patient-duplicate.json"
    case, issues, failures = map_files([*good, bad, tmp_path / "missing.json"])
    assert len(failures) == 2
    assert failures[0].startswith(str(bad))
    assert "duplicate JSON property" in failures[0]
    assert all("\n" not in f for f in failures)
    out = tmp_path / "bundle.json"
    write_bundle(case, out)
    bundle = Bundle.model_validate_json(out.read_bytes())
    assert bundle.entry is not None
    assert len(bundle.entry) > 10
    assert all(format_issue(i).count("\n") == 0 for i in issues)
