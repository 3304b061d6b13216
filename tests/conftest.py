"""Shared fixtures: settings on a temp data dir, the app with an in-process client, tokens,
and the store on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from connectors.smart import PrivateKey, generate_private_key, jwks
from fhir_gateway.app import create_app
from fhir_gateway.sandbox import SandboxClient, SandboxConfig, SandboxServer
from fhir_gateway.security.auth import mint_dev_token
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
        s = _fresh_pg_database(base, request.node.name, key_dir=settings.data_dir / "keys")
    yield s
    s.dispose()


def _fresh_pg_database(base_url: str, name: str, key_dir: Path | None = None) -> Store:
    import re

    from sqlalchemy import create_engine, text

    db = "t_" + re.sub(r"[^a-z0-9]", "_", name.lower())[:50]
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{db}"'))
        c.execute(text(f'CREATE DATABASE "{db}"'))
    admin.dispose()
    return open_store(base_url.rsplit("/", 1)[0] + f"/{db}", key_dir=key_dir)


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


# --- PHI log scan over the whole session ---------------------------------------------------

_COLLECTOR = None


def pytest_configure(config: pytest.Config) -> None:
    import logging

    from fhir_gateway.logging import configure_logging
    from tests.phi import Collector

    configure_logging("console", "INFO")  # structlog through stdlib, as in production
    global _COLLECTOR
    _COLLECTOR = Collector()
    root = logging.getLogger()
    root.addHandler(_COLLECTOR)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.phi import phi_terms, scan

    if _COLLECTOR is None:
        return
    terms = phi_terms(FIXTURES)
    hits = scan(_COLLECTOR.records, terms)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    line = (
        f"PHI log scan: {len(_COLLECTOR.records)} log records checked against "
        f"{len(terms)} fixture patient names/identifiers/birth dates: {len(hits)} hits"
    )
    if reporter is not None:
        from tests.summary import LINES

        for extra in LINES:
            reporter.write_line(extra)
        reporter.write_line(line)
        for name, term, text in hits[:20]:
            reporter.write_line(f"  PHI in log of {name}: {term!r} in {text!r}")
    if hits:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- FHIR pull: SMART client keys and a sandbox EHR on a loopback port ---

SYNTHEA = FIXTURES / "synthea"
CLIENT_ID = "fhir-gateway-test"


@pytest.fixture(scope="session")
def rsa_key() -> PrivateKey:
    return generate_private_key("RSA")


@pytest.fixture(scope="session")
def ec_key() -> PrivateKey:
    return generate_private_key("EC")


@pytest.fixture
def synthea_dir(tmp_path: Path) -> Path:
    data = tmp_path / "ehr-data"
    shutil.copytree(SYNTHEA, data)
    return data


SandboxFactory = Callable[..., SandboxServer]


@pytest.fixture
def sandbox(rsa_key: PrivateKey, ec_key: PrivateKey, synthea_dir: Path) -> Iterator[SandboxFactory]:
    """Start sandboxes (SMART enforced, our test client registered) and stop them afterwards."""
    started: list[SandboxServer] = []

    def start(
        data_dir: Path | None = None,
        scopes: tuple[str, ...] = ("system/*.cruds",),
        **kwargs: object,
    ) -> SandboxServer:
        client = SandboxClient(CLIENT_ID, jwks([rsa_key, ec_key]), scopes)
        config = SandboxConfig(
            data_dir=data_dir or synthea_dir,
            clients={CLIENT_ID: client},
            **kwargs,  # type: ignore[arg-type]
        )
        server = SandboxServer(config).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def add_case(store: Store, case_id: str, patient_ref: str, partner_id: str = "p1") -> None:
    """A referral case row, as intake would have made it (for tests of what follows intake)."""
    from fhir_gateway.store.models import Case

    with store.session() as s:
        s.add(
            Case(
                id=case_id,
                partner_id=partner_id,
                status="received",
                task_id=f"task-{case_id}",
                service_request_id=f"sr-{case_id}",
                patient_ref=patient_ref,
            )
        )


def partner_toml(
    partner_id: str, base_url: str, key_file: str, kid: str, *, destination: bool = False
) -> str:
    """One `[[partners]]` entry whose FHIR endpoint (and destination) uses SMART with `key_file`."""
    auth = (
        f'{{ type = "smart", client_id = "fhir-gateway", key_file = "{key_file}", kid = "{kid}" }}'
    )
    text = f"""
[[partners]]
id = "{partner_id}"
name = "Partner {partner_id}"
identifier = {{ system = "urn:oid:2.16.840.1.113883.3.9999", value = "{partner_id}" }}

[partners.fhir]
base_url = "{base_url}"
auth = {auth}
"""
    if destination:
        text += f'\n[partners.destination]\nbase_url = "{base_url}"\nauth = {auth}\n'
    return text


def partner_sandbox(settings: Settings, data: Path, **config: Any) -> SandboxServer:
    """A started sandbox EHR that knows the gateway as the example partners file names it:
    client `fhir-gateway`, key `keys/st-elsewhere.pem` (written now, EC) under kid gw-1."""
    from connectors.smart import public_jwk, write_private_key

    key = write_private_key(settings.data_dir / "keys" / "st-elsewhere.pem", "EC")
    client = SandboxClient("fhir-gateway", {"keys": [public_jwk(key, kid="gw-1")]})
    return SandboxServer(
        SandboxConfig(data_dir=data, clients={"fhir-gateway": client}, **config)
    ).start()
