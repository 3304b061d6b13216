"""Shared fixtures: settings on a temp data dir, the app with an in-process client, tokens,
and the store on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_gateway.app import create_app
from fhir_gateway.auth import mint_dev_token
from fhir_gateway.settings import JobSettings, Settings
from fhir_gateway.store import Store, open_store
from tests.servers.postgres import postgres_cluster

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def load_fixture(rel: str) -> Any:
    return json.loads((FIXTURES / rel).read_text(encoding="utf-8"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    shutil.copy(FIXTURES / "partners" / "partners.toml", d / "partners.toml")
    return d


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        log_format="console",
        jobs=JobSettings(lease_s=2, poll_s=0.05, backoff_base_s=0.01, backoff_cap_s=0.05),
    )


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def store(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Store]:
    """The store on each engine: SQLite in the data dir, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        s = open_store(settings.db_url)
    else:
        base = request.getfixturevalue("pg_url")
        s = _fresh_pg_database(base, request.node.name)
    yield s
    s.dispose()


def _fresh_pg_database(base_url: str, name: str) -> Store:
    import re

    from sqlalchemy import create_engine, text

    db = "t_" + re.sub(r"[^a-z0-9]", "_", name.lower())[:50]
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{db}"'))
        c.execute(text(f'CREATE DATABASE "{db}"'))
    admin.dispose()
    return open_store(base_url.rsplit("/", 1)[0] + f"/{db}")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, configure_logs=False)
    with TestClient(app) as c:
        yield c


class Tokens:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def headers(
        self, role: str, sub: str = "tester", partner: str | None = None, **extra: str
    ) -> dict[str, str]:
        if role == "ehr" and partner is None:
            partner = "st-elsewhere"
        token = mint_dev_token(self.data_dir, role=role, sub=sub, partner=partner)
        return {"Authorization": f"Bearer {token}", **extra}


@pytest.fixture
def tokens(data_dir: Path) -> Tokens:
    return Tokens(data_dir)


FHIR_JSON = {"Content-Type": "application/fhir+json"}
