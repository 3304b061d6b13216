"""Property-based API run (schemathesis over our OpenAPI schema): no 5xx for any input, as each
role, and responses conform to the schema.

CI runs 25 examples per operation. The full run (README, "Security") asks for 200 per operation:
    FHIR_GATEWAY_SCHEMATHESIS_EXAMPLES=200 .venv/bin/python -m pytest -q \
        tests/api/test_schemathesis.py
At the end it prints operations x roles x examples and the count of 5xx answers.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from schemathesis import Case

from fhir_gateway.app import create_app
from fhir_gateway.settings import Settings
from tests.conftest import FIXTURES

MAX_EXAMPLES = int(os.environ.get("FHIR_GATEWAY_SCHEMATHESIS_EXAMPLES", "25"))


def _app() -> FastAPI:
    import shutil
    import tempfile
    from pathlib import Path

    data = Path(tempfile.mkdtemp(prefix="fhir-gateway-st-")) / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "partners" / "partners.toml", data / "partners.toml")
    return create_app(Settings(data_dir=data, log_level="CRITICAL"), configure_logs=False)


APP = _app()
# The schema from the app object: /openapi.json is off by default (settings.api_docs).
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(APP.openapi())))
schema.app = APP


CALLS: Counter[str] = Counter()  # examples run per operation (each sent as every role)
SERVER_ERRORS: list[str] = []


@pytest.fixture(scope="module")
def app(request: pytest.FixtureRequest):
    from fastapi.testclient import TestClient

    with TestClient(APP):  # runs the lifespan: opens the store
        yield APP
    if CALLS:
        counts = sorted(CALLS.values())
        capture = request.config.pluginmanager.getplugin("capturemanager")
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        assert capture is not None
        assert reporter is not None
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\nschemathesis: {len(counts)} operations x {len(ROLES)} roles, examples per "
                f"operation min {counts[0]} median {counts[len(counts) // 2]} max {counts[-1]} "
                f"(asked {MAX_EXAMPLES}), {sum(counts) * len(ROLES)} requests, "
                f"{len(SERVER_ERRORS)} 5xx"
            )
            few = sorted(f"{op} ({n})" for op, n in CALLS.items() if n < MAX_EXAMPLES)
            if few:  # hypothesis stops early when an operation has few distinct inputs
                reporter.write_line(f"schemathesis: fewer examples: {', '.join(few)}")


ROLES = {
    "none": None,
    "ehr": ("ehr", "st-elsewhere"),
    "reviewer": ("reviewer", None),
    "admin": ("admin", None),
}


@schema.parametrize()
@hsettings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Case[Any], app) -> None:
    from fhir_gateway.security.auth import mint_dev_token

    for role, who in ROLES.items():
        headers = dict(case.headers or {})
        if who is not None:
            r, partner = who
            token = mint_dev_token(
                app.state.settings.data_dir, role=r, sub=f"st-{r}", partner=partner
            )
            headers["Authorization"] = f"Bearer {token}"
        response = case.call(headers=headers)
        if response.status_code >= 500:
            SERVER_ERRORS.append(f"{role} {case.method} {case.path}")
        assert response.status_code < 500, (role, case.method, case.path, response.text[:500])
    CALLS[case.operation.label] += 1
