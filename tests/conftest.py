"""Shared fixtures: SMART client keys and a sandbox EHR on a loopback port."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectors.smart import PrivateKey, generate_private_key, jwks
from fhir_gateway.sandbox import SandboxClient, SandboxConfig, SandboxServer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
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
