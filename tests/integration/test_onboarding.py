"""Day one on a fresh machine: `init`, `partners check [--probe]`, `serve` refusing missing
secrets, read commands refusing a new database, one-line errors, piped tables, the demo failing
with its reason. The CLI runs as a subprocess, as a newcomer runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_gateway.sandbox import SandboxConfig, SandboxServer
from fhir_gateway.sandbox.server import free_port, load_clients
from fhir_gateway.settings import load_partners, secret_problems

ROOT = Path(__file__).resolve().parents[2]
PACS_ENV = "ST_ELSEWHERE_PACS_PASSWORD"


def run(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The CLI with stdout and stderr piped (not a terminal) and no COLUMNS."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_GATEWAY_")}
    base.pop("COLUMNS", None)
    base.pop(PACS_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "fhir_gateway.cli", *args],
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fill_template(partners: Path, fhir_base: str, destination_base: str) -> None:
    """What a newcomer does: uncomment the template's partner block and fill in the URLs."""
    text = partners.read_text(encoding="utf-8")
    head, _, block = text.partition("# --- a partner:")
    lines = [
        line[2:] if line.startswith("# ") else line.lstrip("#") for line in block.splitlines()[1:]
    ]
    filled = "\n".join(lines)
    filled = filled.replace('"https://ehr.st-elsewhere.example/fhir"', f'"{fhir_base}"', 1)
    filled = filled.replace('"https://ehr.st-elsewhere.example/fhir"', f'"{destination_base}"', 1)
    partners.write_text(head + filled + "\n", encoding="utf-8")


def test_init_then_partners_check_from_an_empty_directory(tmp_path, synthea_dir):
    inst = tmp_path / "inst"
    r = run("init", str(inst), "--org-name", "Oncology Review Board")
    assert r.returncode == 0, r.stderr
    assert (inst / "gateway.db").is_file()
    assert (inst / "keys" / "gateway.pem").stat().st_mode & 0o777 == 0o600
    jwks = json.loads((inst / "keys" / "gateway.jwks.json").read_text())
    assert [k["kid"] for k in jwks["keys"]] == ["gateway-1"]
    assert "d" not in jwks["keys"][0]  # public only
    assert load_partners(inst / "partners.toml").organization.name == "Oncology Review Board"
    assert run("init", str(inst)).returncode == 2  # never over an existing one

    r = run("partners", "check", "--data-dir", str(inst))
    assert r.returncode == 1
    assert "no partners registered yet" in r.stdout

    # The partner's EHR is a sandbox that registered our public keys (no "scopes": the default).
    clients = tmp_path / "clients.json"
    rel = os.path.relpath(inst / "keys" / "gateway.jwks.json", tmp_path)
    clients.write_text(json.dumps([{"client_id": "fhir-gateway", "jwks_file": rel}]))
    registered = load_clients(clients)
    assert registered["fhir-gateway"].scopes == ("system/*.cruds",)
    with SandboxServer(SandboxConfig(data_dir=synthea_dir, clients=registered)) as ehr:
        closed = f"http://127.0.0.1:{free_port()}/fhir"
        fill_template(inst / "partners.toml", ehr.base_url, closed)

        r = run("partners", "check", "--data-dir", str(inst))
        assert r.returncode == 1
        assert r.stdout.strip().splitlines() == [
            f"partners.0.dicomweb.auth (st-elsewhere): environment variable {PACS_ENV} "
            "(password) is not set"
        ]
        r = run("partners", "check", "--data-dir", str(inst), env={PACS_ENV: "x"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout == ""

        r = run("partners", "check", "--probe", "--data-dir", str(inst), env={PACS_ENV: "x"})
        assert r.returncode == 1  # the destination's port is closed
        problems = r.stdout.strip().splitlines()
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"partners.0.destination (st-elsewhere) {closed}: ")
        assert "could not connect" in problems[0]
        token_requests = [e for e in ehr.state.log if e.path.endswith("/token")]
        assert token_requests  # the FHIR endpoint: discovery and a token, granted

    assert "Traceback" not in r.stderr


def test_serve_refuses_a_partners_file_whose_secrets_are_missing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "partners.toml").write_text((ROOT / "fixtures/partners/partners.toml").read_text())
    r = run("serve", "--data-dir", str(data), "--port", str(free_port()))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: partners file names secrets that are missing (4): ")
    assert "keys/st-elsewhere.pem does not exist" in lines[0]
    assert PACS_ENV in lines[0]
    assert "MERCY_NORTH_TOKEN" in lines[0]
    assert not (data / "gateway.db").exists()  # refused before anything started


def test_serve_starts_quietly_once_the_secrets_are_there(tmp_path):
    """The filled template starts: no alembic plugin lines, /health answers."""
    inst = tmp_path / "inst"
    assert run("init", str(inst)).returncode == 0
    fill_template(inst / "partners.toml", "http://127.0.0.1:9/fhir", "http://127.0.0.1:9/fhir")
    assert secret_problems(load_partners(inst / "partners.toml")) == [
        f"partners.0.dicomweb.auth (st-elsewhere): environment variable {PACS_ENV} "
        "(password) is not set"
    ]
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_GATEWAY_")}
    argv = ["serve", "--data-dir", str(inst), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_gateway.cli", *argv],
        env={**base, "PYTHONPATH": str(ROOT), PACS_ENV: "secret"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        healthy = False
        for _ in range(150):
            try:
                healthy = requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok
            except requests.ConnectionError:
                healthy = False
            if healthy or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert healthy
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "Uvicorn running" in stderr  # the log works ...
    assert "setup plugin" not in stderr  # ... without alembic's plugin announcements


def test_read_commands_refuse_to_create_a_database(tmp_path):
    for command in (["cases"], ["jobs"], ["deliveries"], ["audit", "verify"]):
        r = run(*command, cwd=tmp_path)
        assert r.returncode == 2, (command, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"no gateway database in data directory {tmp_path / 'data'}" in lines[0]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["jobs"], {"FHIR_GATEWAY_JOBS__WORKERS": "many"}, "error: setting jobs.workers: "),
        (["token", "--role", "admin", "--sub", "x", "--data-dir", "afile"], {}, "not a directory"),
        (["cases"], {"FHIR_GATEWAY_DATABASE_URL": "nonsense"}, "error: cannot open database"),
        (["sandbox", "--clients", "missing.json", "--data", "."], {}, "cannot read sandbox"),
    ],
)
def test_configuration_problems_are_one_line(tmp_path, args, env, expected):
    (tmp_path / "afile").write_text("not a directory")
    r = run(*args, cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_tables_keep_ids_whole_when_piped(tmp_path):
    from fhir_gateway.intake import referrals
    from fhir_gateway.security.access import Principal
    from fhir_gateway.store import open_store

    inst = tmp_path / "inst"
    assert run("init", str(inst)).returncode == 0
    store = open_store(f"sqlite:///{inst / 'gateway.db'}")
    bundle = json.loads((ROOT / "fixtures/referrals/referral-transaction.json").read_text())
    result = referrals.intake_transaction(
        store,
        bundle,
        Principal("e", "ehr", "st-elsewhere"),
        load_partners(ROOT / "fixtures/partners/partners.toml"),
    )
    store.dispose()
    assert result.case_id is not None
    for command in ("cases", "jobs"):
        r = run(command, "--data-dir", str(inst))
        assert r.returncode == 0, r.stderr
        assert result.case_id in r.stdout, r.stdout  # on one line, not wrapped at 80 columns


def test_demo_failure_says_why_and_what_to_do(tmp_path):
    """A broken report font (as a missing Debian font package was): reason, log line, advice."""
    missing = tmp_path / "no-such-font.ttf"
    r = run("demo", env={"FHIR_GATEWAY_REPORTS__FONT_REGULAR": str(missing)}, timeout=300)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert "demo failed: POST /cases/" in r.stderr
    assert "$submit -> HTTP 500" in r.stderr
    assert f"reason='report regular font {missing} does not exist'" in r.stderr
    kept = next(line for line in r.stderr.splitlines() if "log and data kept in" in line)
    tmp = Path(kept.split("log and data kept in ")[1].split(" (log:")[0])
    try:
        assert (tmp / "demo.log").is_file()
        assert (tmp / "data" / "gateway.db").is_file()
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
