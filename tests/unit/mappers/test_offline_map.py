"""`fhir-gateway map` logic: well-formed files mapped, one-line failure per unusable file."""

from __future__ import annotations

import io
import json
from pathlib import Path

from fhir.resources.R4B.bundle import Bundle

from fhir_gateway.casebundle.offline_map import map_files, write_bundle
from fhir_gateway.cli import format_issue, map_command
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


def test_map_command_writes_bundle_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "bundle.json"
    err = io.StringIO()
    files = [FIXTURES / "hl7v2" / "LAB-ORU-1.hl7", FIXTURES / "fhir" / "colon_Darin_Skiles.json"]
    assert map_command(files, out, stderr=err) == 0
    bundle = Bundle.model_validate_json(out.read_bytes())
    assert bundle.type == "collection"
    patients = [
        e for e in bundle.entry or [] if e.resource and e.resource.get_resource_type() == "Patient"
    ]
    assert len(patients) == 1
    lines = err.getvalue().splitlines()
    assert lines, "the HL7 v2 message has data-quality issues to report"
    assert all(line.split(":", 1)[0] in ("error", "warning", "information") for line in lines)


def test_map_command_unusable_file_exit_2_one_line_each(tmp_path: Path) -> None:
    bad = FIXTURES / "bad" / "fhir" / "patient-duplicate.json"
    stdout, err = io.BytesIO(), io.StringIO()
    code = map_command(
        [FIXTURES / "ccda" / "CCD_2.xml", bad, tmp_path / "missing.json"],
        None,
        stdout=stdout,
        stderr=err,
    )
    assert code == 2
    failures = [line for line in err.getvalue().splitlines() if line.startswith(str(tmp_path))]
    failures += [line for line in err.getvalue().splitlines() if line.startswith(str(bad))]
    assert len(failures) == 2
    assert "cannot read" in failures[0]
    assert "duplicate JSON property" in failures[1]
    bundle = json.loads(stdout.getvalue())  # the usable file is still mapped
    assert bundle["resourceType"] == "Bundle"
    assert any(e["resource"]["resourceType"] == "Patient" for e in bundle["entry"])


def test_map_command_nothing_usable_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bundle.json"
    err = io.StringIO()
    assert map_command([FIXTURES / "bad" / "fhir" / "patient-duplicate.json"], out, stderr=err) == 2
    assert not out.exists()
    assert len(err.getvalue().splitlines()) == 1
    assert map_command([], out, stderr=err) == 2
