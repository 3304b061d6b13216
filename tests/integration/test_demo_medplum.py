"""A second validator over the demo: every resource the demo produces through Medplum's
`validateResource` (tests/servers/medplum/validate.mjs, FHIR R4 base definitions).

Runs the demo loop (sandbox EHR and PACS, the gateway over loopback HTTP) and validates the case
bundle it serves (GET /cases/{id}/bundle), the delivered DiagnosticReport (GET /cases/{id}/report)
and its companions built by the same mapper: the standalone Observations, reviewer Practitioner
and Provenance, the transaction form, and the DocumentReference fallback.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from typing import Any

import pytest
from rich.console import Console

from fhir_gateway.demo import run_demo
from mappers.report import (
    report_document_reference,
    report_provenance,
    report_transaction,
    split_contained,
)
from tests.summary import LINES as summary_lines
from tests.unit.test_medplum_validation import MEDPLUM


def _validator() -> str:
    node = shutil.which("node")
    reason = None
    if node is None:
        reason = "node is not installed"
    elif not (MEDPLUM / "node_modules" / "@medplum" / "core").is_dir():
        reason = "@medplum/core not installed (sh tests/servers/medplum/install.sh)"
    if reason is not None:
        if os.environ.get("FHIR_GATEWAY_REQUIRE_SERVERS") == "1":
            pytest.fail(f"Medplum validator required but unavailable: {reason}")
        pytest.skip(reason)
    assert node is not None
    return node


def validate(node: str, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [node, "--experimental-websocket", "validate.mjs"],
        cwd=MEDPLUM,
        input="\n".join(json.dumps(r) for r in resources),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.server
def test_everything_the_demo_produces_validates_with_medplum() -> None:
    node = _validator()
    collected: dict[str, Any] = {}
    out = io.StringIO()
    run_demo(Console(file=out, width=120), collect=collected)
    bundle = collected["bundle"]
    report = collected["diagnosticReport"]
    assert bundle["type"] == "collection"
    assert report["resourceType"] == "DiagnosticReport"
    # the delivered report carries the specimen and the question (US Core DR Note)
    assert report["specimen"][0]["identifier"]["value"] == "S17-0412"
    assert "Question from the referrer" in report["text"]["div"]
    observations, practitioner = split_contained(report)
    companions = [
        *observations,
        practitioner,
        report_provenance(report),
        report_document_reference(report),
    ]
    transaction = report_transaction(report)
    # validate.mjs validates each entry of a Bundle it is given
    results = validate(node, [bundle, report, *companions, transaction])
    summary = results[-1]
    failures = [r for r in results[:-1] if r["errors"]]
    summary_lines.append(
        f"Medplum validateResource over the demo: {summary['validated']} resources "
        f"(case bundle {len(bundle['entry'])} entries, DiagnosticReport, {len(companions)} "
        f"companions, transaction {len(transaction['entry'])} entries), "
        f"{summary['errors']} errors"
    )
    expected = len(bundle["entry"]) + 1 + len(companions) + len(transaction["entry"])
    assert summary["validated"] == expected
    assert summary["errors"] == 0, json.dumps(failures[:5], indent=1)


@pytest.mark.server
def test_the_validator_reports_errors() -> None:
    """The check can fail: a resource with a wrong type and a bad code is refused."""
    node = _validator()
    bad = {
        "resourceType": "DiagnosticReport",
        "id": "x",
        "status": "not-a-status",
        "code": {"text": "x"},
        "specimen": "Specimen/1",
    }
    results = validate(node, [bad])
    assert results[-1]["errors"] > 0
