"""Behind a real reverse proxy: Debian's nginx terminates TLS in front of the gateway on loopback.

The gateway's advertised URLs (SMART discovery, CapabilityStatement, search links) are its public
base URL (`https://127.0.0.1:NGINXPORT`); a referral pushed through nginx works; forwarded
headers are believed only from `trusted_proxies` (nginx connects from 127.0.0.2): a client's
own `X-Forwarded-For` / `X-Forwarded-Proto` is not, and the access log keeps the address the
gateway really saw.
"""

from __future__ import annotations

import copy
import http.client
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_gateway.app import create_app
from fhir_gateway.sandbox.server import AppServer, free_port
from fhir_gateway.settings import Settings
from tests.conftest import FHIR_JSON, Tokens, load_fixture
from tests.servers.nginx import PROXY_ADDRESS, NginxServer, run_nginx

pytestmark = pytest.mark.server

SPOOFED = "203.0.113.9"  # TEST-NET-3: what a client claims to be
SECRET = "MRN-PROXY-5521"


@dataclass
class Proxied:
    nginx: NginxServer
    gateway: AppServer
    tokens: Tokens

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(f"{self.nginx.url}{path}", verify=self.nginx.ca, timeout=30, **kw)


@pytest.fixture
def proxied(settings: Settings, tokens: Tokens, tmp_path: Path) -> Iterator[Proxied]:
    gw_port = free_port()
    with run_nginx(tmp_path / "nginx", gw_port) as nginx:
        public = settings.model_copy(
            update={"public_base_url": nginx.url, "trusted_proxies": [PROXY_ADDRESS]}
        )
        app = create_app(public, configure_logs=False)
        with AppServer(app, gw_port, lifespan=True) as gateway:
            yield Proxied(nginx, gateway, tokens)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.msg for r in caplog.records if r.name == "fhir_gateway.access" and isinstance(r.msg, dict)
    ]


def line_of(caplog: pytest.LogCaptureFixture, rid: str) -> dict[str, Any]:
    """The access line of request `rid`. The server thread writes it after the last byte went
    out, so the client can be ahead of it: wait for it (a bounded wait, not a timing assert)."""
    deadline = time.monotonic() + 10
    while True:
        found = [line for line in access_lines(caplog) if line["request_id"] == rid]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} access lines for request {rid}"
            return found[0]
        time.sleep(0.02)


def test_discovery_and_capabilities_show_the_public_https_url(proxied: Proxied) -> None:
    base = proxied.nginx.url
    smart = proxied.get("/fhir/.well-known/smart-configuration")
    assert smart.status_code == 200, smart.text
    assert smart.json()["token_endpoint"].startswith(f"{base}/")
    cap = proxied.get("/fhir/metadata")
    assert cap.status_code == 200
    assert cap.json()["implementation"]["url"] == f"{base}/fhir"
    assert base.startswith("https://")


def test_a_referral_pushed_through_nginx(proxied: Proxied) -> None:
    bundle: dict[str, Any] = copy.deepcopy(load_fixture("referrals/referral-transaction.json"))
    ehr = proxied.tokens.headers("ehr")
    resp = requests.post(
        f"{proxied.nginx.url}/fhir",
        data=json.dumps(bundle),
        headers=ehr | FHIR_JSON,
        verify=proxied.nginx.ca,
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["type"] == "transaction-response"
    task_id = resp.json()["entry"][3]["response"]["location"].split("/")[1]
    found = proxied.get("/fhir/Task", params={"_id": task_id}, headers=ehr).json()
    assert found["total"] == 1
    assert found["entry"][0]["fullUrl"] == f"{proxied.nginx.url}/fhir/Task/{task_id}"
    assert found["link"][0]["url"].startswith(f"{proxied.nginx.url}/fhir/Task?")


def test_forwarded_headers_only_from_the_trusted_proxy(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    spoof = {"X-Forwarded-For": SPOOFED, "X-Forwarded-Proto": "https"}

    # through nginx: nginx appends the address it saw; the client's own claim is not believed
    via_proxy = proxied.get("/health", headers=spoof)
    assert via_proxy.status_code == 200
    line = line_of(caplog, via_proxy.headers["X-Request-ID"])
    assert (line["client"], line["scheme"]) == ("127.0.0.1", "https")

    # straight to the gateway from 127.0.0.1 (not a trusted proxy): neither header counts
    direct = requests.get(f"{proxied.gateway.url}/health", headers=spoof, timeout=30)
    assert direct.status_code == 200
    line = line_of(caplog, direct.headers["X-Request-ID"])
    assert (line["client"], line["scheme"]) == ("127.0.0.1", "http")

    # control: the same headers from the proxy's address are believed
    conn = http.client.HTTPConnection(
        "127.0.0.1", proxied.gateway.port, timeout=30, source_address=(PROXY_ADDRESS, 0)
    )
    conn.request("GET", "/health", headers=spoof)
    answer = conn.getresponse()
    answer.read()
    conn.close()
    line = line_of(caplog, str(answer.getheader("X-Request-ID")))
    assert (line["client"], line["scheme"]) == (SPOOFED, "https")


def test_no_query_string_in_either_access_log(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    resp = proxied.get(
        "/fhir/Task",
        params={"identifier": f"urn:x|{SECRET}"},
        headers=proxied.tokens.headers("ehr"),
    )
    assert resp.status_code == 200
    line = line_of(caplog, resp.headers["X-Request-ID"])
    assert line["route"] == "/fhir/{resource_type}"
    assert SECRET not in str(line)
    # nginx's request id reached the gateway: one id across both logs
    rid = f"rid={resp.headers['X-Request-ID']}"
    deadline = time.monotonic() + 10  # nginx, too, logs after the response went out
    while rid not in (nginx_log := proxied.nginx.access_log.read_text()):
        assert time.monotonic() < deadline, "nginx logged no line for the request"
        time.sleep(0.02)
    assert SECRET not in nginx_log
    assert "?" not in nginx_log
