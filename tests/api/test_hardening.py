"""No 5xx for any input, no value echoed, no URL from Host, no PHI cached, no open API docs.

Each test sends what once made the gateway answer 500, echo a patient's data or reflect the Host
header, and checks the answer is a 4xx/503 OperationOutcome that names the rule and the place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient

from fhir_gateway.app import create_app
from fhir_gateway.settings import Settings
from fhir_gateway.store import open_store
from tests.api.test_dicomweb_api import World
from tests.api.test_dicomweb_api import world as world  # the fixture
from tests.api.test_referral_intake import entry_of, post_bundle, referral
from tests.conftest import FHIR_JSON, FIXTURES, Tokens
from tests.phi import Collector, scan


@pytest.fixture
def opened(client: TestClient, tokens: Tokens) -> tuple[str, str]:
    """(case id, Task id) of one referral."""
    first = post_bundle(client, tokens, referral())
    task_id = first.json()["entry"][3]["response"]["location"].split("/")[1]
    case_id = client.get("/cases", headers=tokens.headers("admin")).json()[0]["id"]
    return case_id, task_id


def _outcome(resp: Any, status: int | tuple[int, ...]) -> dict[str, Any]:
    wanted = (status,) if isinstance(status, int) else status
    assert resp.status_code in wanted, (resp.status_code, resp.text[:300])
    body: dict[str, Any] = resp.json()
    assert body["resourceType"] == "OperationOutcome"
    return body


# --- 1. no 5xx for any input ------------------------------------------------------------

DEEP = {
    "arrays-3000": b"[" * 3000 + b"]" * 3000,
    "objects-3000": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "objects-100000": b'{"resourceType":"Patient","a":'
    + b'{"a":' * 100_000
    + b"1"
    + b"}" * 100_001,
    "arrays-65": b'{"resourceType":"Patient","extension":' + b"[" * 64 + b"]" * 64 + b"}",
}


@pytest.mark.parametrize("name", DEEP)
def test_deep_json_is_400_at_every_fhir_body_endpoint(client, tokens, opened, name) -> None:
    """README: JSON nested deeper than 64 levels is a 400 (it was a 500 from 3,000 levels:
    json.loads hit Python's recursion limit before the depth check ran)."""
    case_id, task_id = opened
    for method, path, role in (
        ("POST", "/fhir", "ehr"),
        ("POST", "/fhir/Patient", "ehr"),
        ("PUT", f"/fhir/Task/{task_id}", "ehr"),
        ("PUT", f"/cases/{case_id}/report", "admin"),
        ("POST", f"/cases/{case_id}/assignments", "admin"),
    ):
        resp = client.request(
            method, path, content=DEEP[name], headers=tokens.headers(role) | FHIR_JSON
        )
        outcome = _outcome(resp, 400)
        if not path.endswith("/assignments"):  # FastAPI parses that body itself
            assert "nested deeper than 64" in outcome["issue"][0]["diagnostics"]


def test_json_nested_64_levels_is_parsed() -> None:
    from fhir_gateway.intake.validation import json_depth, parse_json

    ok = b"[" * 64 + b"]" * 64
    assert json_depth(ok.decode()) == 64
    assert parse_json(ok) is not None
    assert json_depth('{"a":"[[[[\\"{{{{","b":[]}') == 2  # brackets in strings do not count


def test_json_depth_fast_path_agrees_with_counting_every_bracket() -> None:
    """json_depth's C-pass fast path (innermost pairs removed per round, strings split off at
    their quotes) gives the bracket-by-bracket depth on any text: strings with brackets and
    escaped quotes, unbalanced and invalid JSON, with and without a limit."""
    import random
    import re

    from fhir_gateway.intake.validation import json_depth

    strings = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')

    def counted(text: str) -> int:
        depth = deepest = 0
        for b in re.findall(r"[\[\]{}]", strings.sub("", text)):
            depth += 1 if b in "[{" else -1
            deepest = max(deepest, depth)
        return deepest

    rng = random.Random(17)
    texts = [
        "".join(rng.choice('[]{}"a\\ ,:') for _ in range(rng.randint(0, 30))) for _ in range(20000)
    ]
    texts += ["[" * 300 + "]" * 300, "[" * 5000, "]" * 5 + "[[[]]]", '{"a":"]]\\"[[","b":[[1]]}']
    for text in texts:
        for limit in (None, 0, 2, 64):
            assert json_depth(text, limit) == counted(text), (text, limit)


@pytest.mark.parametrize(
    ("literal", "rule"),
    [
        (b"1234567890123456789.0123456789", "more than 18 significant digits"),
        (b"9" * 5000, "more than 19 digits"),
        (b"NaN", "NaN and Infinity"),
        (b"-Infinity", "NaN and Infinity"),
        (b"1e999", "out of range"),
    ],
)
def test_numbers_fhir_cannot_hold_are_400_with_their_place(client, tokens, literal, rule) -> None:
    body = (
        b'{"resourceType":"Observation","status":"final","code":{"text":"x"},'
        b'"valueQuantity":{"value":' + literal + b"}}"
    )
    resp = client.post("/fhir/Observation", content=body, headers=tokens.headers("ehr") | FHIR_JSON)
    issue = _outcome(resp, 400)["issue"][0]
    assert rule in issue["diagnostics"]
    if rule != "NaN and Infinity":  # a constant has no parse hook with a place
        assert issue["expression"] == ["Observation.valueQuantity.value"]
    if literal[:1].isdigit():
        assert literal.decode()[:12] not in resp.text


def test_corpus_invalid_decimal_observation_is_refused(client, tokens) -> None:
    """bad/fhir/ms_ObservationWithInvalidDecimalSpecification.json was stored (201)."""
    data = (FIXTURES / "bad/fhir/ms_ObservationWithInvalidDecimalSpecification.json").read_bytes()
    resp = client.post("/fhir/Observation", content=data, headers=tokens.headers("ehr") | FHIR_JSON)
    issue = _outcome(resp, 400)["issue"][0]
    assert issue["expression"] == ["Observation.valueQuantity.value"]


BAD_COUNTS = ["9" * 5000, "²", "-1", "1.5", "0x10", "١٢", " 1", "1" * 10, ""]


@pytest.mark.parametrize("param", ["limit", "offset"])
@pytest.mark.parametrize("value", BAD_COUNTS, ids=lambda v: f"{v[:6]!r}x{len(v)}")
def test_qido_limit_and_offset_are_400_naming_the_parameter(
    client, tokens, opened, param, value
) -> None:
    case_id, _ = opened
    for level in ("studies", "series", "instances"):
        resp = client.get(
            f"/cases/{case_id}/dicom-web/{level}",
            params={param: value},
            headers=tokens.headers("admin"),
        )
        issue = _outcome(resp, 400)["issue"][0]
        assert issue["expression"] == [param]
        assert param in issue["diagnostics"]


def test_qido_good_limit_and_offset_still_work(client, tokens, opened) -> None:
    case_id, _ = opened
    resp = client.get(
        f"/cases/{case_id}/dicom-web/studies",
        params={"limit": "5", "offset": "0"},
        headers=tokens.headers("admin"),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == []


@pytest.mark.parametrize("rid", ["²", "9" * 5000, "99999999999999999999", "-31415926"])
def test_unknown_audit_event_ids_are_404(client, tokens, rid) -> None:
    resp = client.get(f"/fhir/AuditEvent/{rid}", headers=tokens.headers("admin"))
    _outcome(resp, 404)
    assert rid[:8] not in resp.text


@pytest.mark.parametrize(
    "value", ["2030-01-01T00:00:00", "2030-01-01", "9999-12-31T23:00:00-05:00"]
)
def test_assignment_expiry_needs_a_time_zone(client, tokens, opened, value) -> None:
    """A naive expires_at was a 500 (the store refuses naive datetimes). Refused, documented."""
    case_id, _ = opened
    resp = client.post(
        f"/cases/{case_id}/assignments",
        json={"reviewer": "alice", "expires_at": value},
        headers=tokens.headers("admin"),
    )
    issue = _outcome(resp, 400)["issue"][0]
    assert issue["expression"] == ["body.expires_at"]
    ok = client.post(
        f"/cases/{case_id}/assignments",
        json={"reviewer": "alice", "expires_at": "2030-01-01T00:00:00+02:00"},
        headers=tokens.headers("admin"),
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["expiresAt"] == "2029-12-31T22:00:00.000Z"


def test_audit_date_search_out_of_range_is_400(client, tokens) -> None:
    for value in ("ge0001-01-01T00:00:00+05:00", "lt²", "eq9999-12-31T23:00:00-05:00"):
        resp = client.get(
            "/fhir/AuditEvent", params={"date": value}, headers=tokens.headers("admin")
        )
        _outcome(resp, 400)


@pytest.fixture
def read_only_client(settings: Settings, tokens: Tokens) -> Iterator[TestClient]:
    """The app on a database it can read but not write, as with a read-only file or mount
    (SQLite's `mode=ro` gives the same 'attempt to write a readonly database' error; the
    tests run as root, which file permissions would not stop)."""
    open_store(settings.db_url).dispose()  # migrated
    path = settings.data_dir / "gateway.db"
    ro = open_store(
        f"sqlite:///file:{path}?mode=ro&uri=true", migrate=False, key_dir=settings.data_dir / "keys"
    )
    app = create_app(settings, store=ro, configure_logs=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    ro.dispose()


def test_unwritable_database_is_503_not_500(read_only_client: TestClient, tokens) -> None:
    c = read_only_client
    calls = [
        c.get("/cases", headers=tokens.headers("admin")),
        c.post("/fhir", json=referral(), headers=tokens.headers("ehr") | FHIR_JSON),
        c.post(
            "/fhir/Patient",
            json=_patient(birthDate=OK),
            headers=tokens.headers("ehr") | FHIR_JSON,
        ),
        c.get("/fhir/AuditEvent", headers=tokens.headers("admin")),
    ]
    for resp in calls:
        issue = _outcome(resp, 503)["issue"][0]
        assert issue["code"] == "transient"
        assert "database" in issue["diagnostics"]
        assert resp.headers["Retry-After"] == "30"
        assert "readonly" not in resp.text  # no driver detail to the caller


# --- 3. errors name the rule and the place, never the value --------------------------------

SURNAME, GIVEN, MRN, BIRTH = "Quillfeatherby", "Zephyrinaxa", "MRN-7731-QX", "1961-02-30"
OK = "1961-02-03"  # a valid birth date, for the posts whose error is elsewhere


def _patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": MRN}],
        "name": [{"family": SURNAME, "given": [GIVEN]}],
        "birthDate": BIRTH,  # not a date: every post of it is an error
        **extra,
    }


def _error_inputs(case_id: str, task_id: str) -> list[tuple[str, str, str, Any]]:
    """(method, path, role, JSON body) reaching each error path with the distinctive values."""
    bundle = referral()
    entry_of(bundle, "Patient")["resource"] = _patient()
    unknown = referral()
    entry_of(unknown, "Organization")["resource"]["identifier"][0]["value"] = MRN
    bad_type = referral()
    bad_type["type"] = SURNAME
    bad_method = referral()
    bad_method["entry"][0]["request"]["method"] = SURNAME
    bad_url = referral()
    bad_url["entry"][1]["request"]["url"] = f"Patient/{MRN}"
    task = entry_of(referral(), "Task")["resource"]
    return [
        ("POST", "/fhir/Patient", "ehr", _patient()),
        ("POST", "/fhir/Patient", "ehr", _patient(birthDate=OK, gender=SURNAME)),
        ("POST", "/fhir/Patient", "ehr", _patient(birthDate=OK, active=MRN)),
        ("POST", "/fhir/Patient", "ehr", _patient(birthDate=OK, deceasedDateTime=BIRTH)),
        (
            "POST",
            "/fhir/Patient",
            "ehr",
            _patient(birthDate=OK, multipleBirthInteger=MRN),
        ),
        (
            "POST",
            "/fhir/Patient",
            "ehr",
            {**_patient(), "resourceType": "Patient", "id": MRN + "!"},
        ),
        ("POST", "/fhir/Observation", "ehr", _patient(birthDate=OK)),
        ("POST", "/fhir", "ehr", bundle),
        ("POST", "/fhir", "ehr", unknown),
        ("POST", "/fhir", "ehr", bad_type),
        ("POST", "/fhir", "ehr", bad_method),
        ("POST", "/fhir", "ehr", bad_url),
        ("PUT", f"/fhir/Task/{task_id}", "ehr", {**task, "status": SURNAME}),
        ("PUT", f"/fhir/Task/{task_id}", "ehr", {**task, "id": MRN}),
        ("PUT", f"/cases/{case_id}/report", "admin", {"kind": SURNAME, "summary": MRN}),
        ("PUT", f"/cases/{case_id}/report", "admin", {"findings": [{"references": [MRN]}]}),
        ("POST", f"/cases/{case_id}/assignments", "admin", {"reviewer": MRN, "expires_at": BIRTH}),
        ("POST", f"/cases/{case_id}/status", "admin", {"status": SURNAME, "reason": MRN}),
    ]


def test_errors_never_echo_names_identifiers_or_birth_dates(client, tokens, opened) -> None:
    """Distinctive values pushed into every error path come back in no response and reach no
    log line (pydantic's messages quoted the input; our own messages formatted it)."""
    case_id, task_id = opened
    collector = Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        answers = []
        for method, path, role, body in _error_inputs(case_id, task_id):
            resp = client.request(method, path, json=body, headers=tokens.headers(role) | FHIR_JSON)
            assert 400 <= resp.status_code < 500, (method, path, resp.status_code, resp.text)
            answers.append((method, path, resp.text))
        extra = [
            client.post(
                "/fhir/Patient",
                json=_patient(birthDate=OK),
                headers=tokens.headers("ehr") | FHIR_JSON | {"If-None-Exist": f"name={SURNAME}"},
            ),
            client.get("/fhir/AuditEvent", params={"date": BIRTH}, headers=tokens.headers("admin")),
            client.get(
                f"/cases/{case_id}/dicom-web/studies",
                params={"limit": MRN},
                headers=tokens.headers("admin"),
            ),
        ]
        for resp in extra:
            assert 400 <= resp.status_code < 500, resp.text
            answers.append(("extra", str(resp.url), resp.text))
    finally:
        root.removeHandler(collector)
    terms = {SURNAME, GIVEN, MRN, BIRTH}
    for method, path, text in answers:
        leaked = [t for t in terms if t in text]
        assert not leaked, (method, path, leaked, text[:400])
    # The gateway's log lines (the test client's own httpx log of its URLs is not ours).
    hits = scan([r for r in collector.records if not r[0].startswith("httpx")], terms)
    assert hits == [], hits[:3]
    assert len(answers) >= 20


def test_pydantic_message_drops_the_input() -> None:
    from fhir_gateway.errors import pydantic_message

    err = {"msg": f"Value error, {SURNAME} is not a date", "input": SURNAME}
    assert SURNAME not in pydantic_message(err)
    assert pydantic_message({"msg": "Input should be a valid integer", "input": 1}) == (
        "Input should be a valid integer"
    )


# --- 4. absolute URLs from the configured base, never from Host ------------------------------

EVIL = "evil.example:666"


def test_wado_retrieve_urls_ignore_the_host_header(world: World) -> None:
    headers = world.reviewer() | {"Host": EVIL}
    base = world.dw(world.case1)  # the configured public base URL is the server's
    for level in ("studies", "series", "instances"):
        resp = requests.get(f"{world.dw(world.case1)}/{level}", headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        urls = [r["00081190"]["Value"][0] for r in resp.json()]
        assert urls
        assert all(u.startswith(base + "/studies/") for u in urls), urls
        assert "evil" not in resp.text
    study = resp.json()[0]["0020000D"]["Value"][0]
    wado = requests.get(
        f"{world.dw(world.case1)}/studies/{study}",
        headers=headers | {"Accept": 'multipart/related; type="application/dicom"'},
        timeout=60,
    )
    assert wado.status_code == 200
    locations = re.findall(rb"Content-Location: (\S+)", wado.content)
    assert locations
    assert all(loc.decode().startswith(base) for loc in locations)
    limited = requests.get(
        f"{world.dw(world.case1)}/instances", params={"limit": "1"}, headers=headers, timeout=30
    )
    assert "evil" not in limited.headers.get("Warning", "")


def test_discovery_links_and_redirects_ignore_the_host_header(client, tokens) -> None:
    evil = {"Host": EVIL}
    smart = client.get("/fhir/.well-known/smart-configuration", headers=evil).json()
    assert smart["token_endpoint"] == "http://127.0.0.1:8080/auth/token"
    cap = client.get("/fhir/metadata", headers=evil).json()
    assert "evil" not in str(cap)
    oauth = cap["rest"][0]["security"]["extension"][0]["extension"][0]
    assert oauth == {"url": "token", "valueUri": "http://127.0.0.1:8080/auth/token"}
    search = client.get(
        "/fhir/Patient", params={"identifier": "a|b"}, headers=tokens.headers("admin") | evil
    )
    assert search.json()["link"][0]["url"].startswith("http://127.0.0.1:8080/fhir/Patient?")
    for path in ("/cases/", "/fhir/metadata/", "/admin/jobs/"):
        resp = client.get(path, headers=tokens.headers("admin") | evil, follow_redirects=False)
        assert resp.status_code == 404, (path, resp.status_code)
        assert "location" not in resp.headers


def test_configured_public_base_url_is_used(data_dir) -> None:
    settings = Settings(data_dir=data_dir, public_base_url="https://gw.example.org/base/")
    assert settings.base_url == "https://gw.example.org/base"
    app = create_app(settings, configure_logs=False)
    with TestClient(app) as c:
        doc = c.get("/fhir/.well-known/smart-configuration").json()
    assert doc["token_endpoint"] == "https://gw.example.org/base/auth/token"
    with pytest.raises(ValueError, match="absolute http"):
        Settings(data_dir=data_dir, public_base_url="gw.example.org")


# --- 5. no caching of PHI, no sniffing ---------------------------------------------------------

CACHEABLE = {"/fhir/metadata", "/fhir/.well-known/smart-configuration", "/.well-known/jwks.json"}


def test_every_route_sends_no_store_and_nosniff(client, tokens, opened) -> None:
    """Every operation of the schema (whatever its answer: 200, 4xx), as admin and anonymous."""
    case_id, task_id = opened
    checked = 0
    for path, operations in client.app.openapi()["paths"].items():
        url = path.replace("{case_id}", case_id).replace("{rid}", task_id)
        url = re.sub(r"\{resource_type\}", "Task", url)
        url = re.sub(r"\{[^}]+\}", "x", url)
        for method in operations:
            anonymous: dict[str, str] = {}
            for headers in (tokens.headers("admin"), anonymous):
                resp = client.request(method.upper(), url, headers=headers)
                assert resp.status_code < 500, (method, url, resp.status_code)
                assert resp.headers["X-Content-Type-Options"] == "nosniff", (method, url)
                if path in CACHEABLE:
                    assert "no-store" not in resp.headers.get("Cache-Control", ""), url
                else:
                    assert resp.headers["Cache-Control"] == "no-store", (method, url)
                checked += 1
    assert checked >= 60
    missing = client.get("/no/such/route")
    assert missing.headers["Cache-Control"] == "no-store"


def test_phi_answers_are_no_store(client, tokens, opened) -> None:
    case_id, task_id = opened
    for url in (f"/cases/{case_id}", f"/fhir/Task/{task_id}", "/fhir/AuditEvent"):
        resp = client.get(url, headers=tokens.headers("admin"))
        assert resp.status_code == 200
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


# --- 6. OpenAPI pages ------------------------------------------------------------------------

DOCS = ("/openapi.json", "/docs", "/redoc")


def test_api_docs_are_off_by_default(client, tokens) -> None:
    for path in DOCS:
        assert client.get(path).status_code == 404
        assert client.get(path, headers=tokens.headers("admin")).status_code == 404
    assert client.app.openapi()["paths"]  # the schema still exists for tests and tools


def test_api_docs_when_enabled_need_an_admin_token(data_dir, tokens) -> None:
    settings = Settings(data_dir=data_dir, api_docs=True)
    with TestClient(create_app(settings, configure_logs=False)) as c:
        for path in DOCS:
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=tokens.headers("reviewer")).status_code == 403, path
            ok = c.get(path, headers=tokens.headers("admin"))
            assert ok.status_code == 200, path
            assert ok.headers["Cache-Control"] == "no-store"
        schema = c.get("/openapi.json", headers=tokens.headers("admin")).json()
        assert "/cases/{case_id}" in schema["paths"]
        page = c.get("/docs", headers=tokens.headers("admin")).text
        assert "SwaggerUIBundle" in page
        assert "/cases/{case_id}" in page


def test_unwritable_data_directory_is_503_other_os_errors_stay_500() -> None:
    """EROFS/EACCES/ENOSPC while writing the data dir (images, keys) is 503 like the database;
    any other OSError is a bug: the catch-all 500 without detail."""
    import errno

    from fastapi import FastAPI

    from fhir_gateway.api.observe import AccessMiddleware
    from fhir_gateway.api.responses import add_error_handlers

    app = FastAPI()
    app.add_middleware(AccessMiddleware)
    add_error_handlers(app)

    @app.get("/read-only")
    def read_only() -> None:
        raise OSError(errno.EROFS, "Read-only file system", "/data/images/x")

    @app.get("/missing")
    def missing() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file", "/data/images/y")

    with TestClient(app, raise_server_exceptions=False) as c:
        ro = c.get("/read-only")
        assert _outcome(ro, 503)["issue"][0]["code"] == "transient"
        assert "/data" not in ro.text
        other = c.get("/missing")
        assert _outcome(other, 500)["issue"][0]["diagnostics"].startswith("internal error")
        assert "/data" not in other.text
        assert other.headers["Cache-Control"] == "no-store"
