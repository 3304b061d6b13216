"""A second validator: every fixture's mapped output through Medplum's `validateResource`.

@medplum/core validates against the FHIR R4 base StructureDefinitions (cardinality, types,
primitive formats such as uri, invariants). Needs Node and `sh tests/servers/medplum/install.sh`;
skipped without them unless FHIR_GATEWAY_REQUIRE_SERVERS=1 (then it fails).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.summary import LINES as summary_lines
from tests.unit.mappers._helpers import ROOT, fixture_files, map_one

MEDPLUM = ROOT / "tests" / "servers" / "medplum"


def _unavailable(reason: str) -> None:
    if os.environ.get("FHIR_GATEWAY_REQUIRE_SERVERS") == "1":
        pytest.fail(f"Medplum validator required but unavailable: {reason}")
    pytest.skip(reason)


@pytest.mark.server
def test_every_mapped_fixture_validates_with_medplum() -> None:
    node = shutil.which("node")
    if node is None:
        _unavailable("node is not installed")
    if not (MEDPLUM / "node_modules" / "@medplum" / "core").is_dir():
        _unavailable("@medplum/core not installed (sh tests/servers/medplum/install.sh)")
    lines = [json.dumps(resource) for path in fixture_files() for resource in map_one(path)[0]]
    done = subprocess.run(
        [str(node), "--experimental-websocket", "validate.mjs"],
        cwd=MEDPLUM,
        input="\n".join(lines),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    summary = results[-1]
    failures = [r for r in results[:-1] if r["errors"]]
    summary_lines.append(
        f"Medplum validateResource over every fixture's mapped output: "
        f"{summary['validated']} resources, {summary['errors']} errors"
    )
    assert summary["validated"] == len(lines)
    assert summary["errors"] == 0, json.dumps(failures[:5], indent=1)
