"""partner_clients: one place turns a partner endpoint's auth into a session / token provider."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.smart import SmartTokenProvider, write_private_key
from fhir_gateway.errors import ConfigError
from fhir_gateway.records.partner_clients import (
    BearerTokenProvider,
    clear_token_cache,
    session_for,
    token_provider_for,
)
from fhir_gateway.settings import (
    BasicAuth,
    BearerAuth,
    DestinationEndpoint,
    DicomwebEndpoint,
    FhirEndpoint,
    SmartAuth,
)


def test_basic_credentials_go_on_the_session_and_no_token(monkeypatch):
    monkeypatch.setenv("PACS_PW", "s3cret")
    endpoint = DicomwebEndpoint(
        base_url="http://pacs/dicom-web",
        auth=BasicAuth(type="basic", username="gw", password_env="PACS_PW"),
    )
    assert session_for(endpoint).auth == ("gw", "s3cret")
    assert token_provider_for(endpoint, resource_types=("ImagingStudy",)) is None
    assert session_for(FhirEndpoint(base_url="http://ehr/fhir")).auth is None


def test_bearer_token_is_read_again_after_invalidate(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    endpoint = FhirEndpoint(
        base_url="http://ehr/fhir", auth=BearerAuth(type="bearer", token_file=token_file)
    )
    provider = token_provider_for(endpoint, resource_types=("Patient",))
    assert isinstance(provider, BearerTokenProvider)
    assert provider.token() == "first"
    token_file.write_text("rotated\n")
    assert provider.token() == "first"  # cached until a 401
    provider.invalidate()
    assert provider.token() == "rotated"


def test_smart_providers_are_shared_per_endpoint_and_scopes(tmp_path: Path):
    clear_token_cache()
    key_file = tmp_path / "k.pem"
    write_private_key(key_file, "EC")
    auth = SmartAuth(type="smart", client_id="gw", key_file=key_file, kid="k1")
    dest = DestinationEndpoint(base_url="http://ehr/fhir", auth=auth)
    a = token_provider_for(dest, resource_types=("DiagnosticReport",), access="crus")
    b = token_provider_for(dest, resource_types=("DiagnosticReport",), access="crus")
    c = token_provider_for(dest, resource_types=("Patient",))
    assert isinstance(a, SmartTokenProvider)
    assert a is b  # one token cache per (endpoint, client, scopes) in the process
    assert c is not a
    clear_token_cache()
    assert token_provider_for(dest, resource_types=("DiagnosticReport",), access="crus") is not a


def test_unreadable_smart_key_is_a_config_error(tmp_path: Path):
    auth = SmartAuth(type="smart", client_id="gw", key_file=tmp_path / "missing.pem", kid="k")
    with pytest.raises(ConfigError):
        token_provider_for(
            FhirEndpoint(base_url="http://other/fhir", auth=auth), resource_types=("Patient",)
        )
