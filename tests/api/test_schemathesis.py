"""Property-based API run (schemathesis over our OpenAPI schema): no 5xx for any input, as each
role, and responses conform to the schema."""

from __future__ import annotations

import os
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
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def app():
    from fastapi.testclient import TestClient

    with TestClient(APP):  # runs the lifespan: opens the store
        yield APP


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
        assert response.status_code < 500, (role, case.method, case.path, response.text[:500])
