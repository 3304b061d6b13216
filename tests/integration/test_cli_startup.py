"""The CLI at startup: data-directory faults are one line and exit 2, and `serve` advertises the
address it binds when no public base URL is configured. Runs the real CLI as a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]

# As root, permission bits stop nobody: drop the capabilities that bypass them (setpriv, from
# util-linux) so a read-only directory is read-only to the command, as for any service user.
if os.geteuid() == 0:
    SETPRIV = shutil.which("setpriv")
    UNPRIVILEGED = (
        [SETPRIV, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
        if SETPRIV
        else None
    )
else:
    UNPRIVILEGED = []


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_GATEWAY_")}
    return {**env, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **extra}


def cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    if UNPRIVILEGED is None:
        pytest.skip("running as root without setpriv: permission bits cannot be tested")
    return subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-m", "fhir_gateway.cli", *args],
        env=_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _missing(tmp: Path) -> tuple[Path, str]:
    parent = tmp / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "data", "does not exist and cannot be created"


def _read_only(tmp: Path) -> tuple[Path, str]:
    d = tmp / "data"
    d.mkdir()
    d.chmod(0o555)
    return d, "is not writable"


def _not_a_directory(tmp: Path) -> tuple[Path, str]:
    f = tmp / "data"
    f.write_text("not a directory\n")
    return f, "is not a directory"


def _read_only_database(tmp: Path) -> tuple[Path, str]:
    d = tmp / "data"
    made = cli("init", str(d))  # creates and migrates gateway.db
    assert made.returncode == 0, made.stderr
    (d / "gateway.db").chmod(0o444)
    return d, "gateway.db is not writable"


FAULTS = {
    "missing": _missing,
    "read-only": _read_only,
    "not-a-directory": _not_a_directory,
    "read-only-database": _read_only_database,
}
COMMANDS = {
    "serve": ["serve", "--port", "1", "--workers", "0"],
    "worker": ["worker"],
    "token": ["token", "--role", "admin", "--sub", "op"],
    "cases": ["cases"],
    "audit-verify": ["audit", "verify"],
}

READ_ONLY_COMMANDS = frozenset({"cases", "audit-verify"})


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for p in tmp_path.rglob("*"):  # let pytest clean up
        if p.is_dir():
            p.chmod(0o755)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_data_dir_fault_is_one_line_exit_2(tmp: Path, fault: str, command: str) -> None:
    data_dir, reason = FAULTS[fault](tmp)
    if fault == "missing" and command in READ_ONLY_COMMANDS:
        reason = "does not exist"  # they read an existing database; they never create one
    r = cli(*COMMANDS[command], "--data-dir", str(data_dir), timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines[:10]
    assert lines[0].startswith("error: "), lines[0]
    assert reason in lines[0]
    assert str(data_dir) in lines[0]


def test_environment_data_dir_fault_is_one_line(tmp: Path) -> None:
    data_dir, reason = _read_only(tmp)
    r = cli("cases", FHIR_GATEWAY_DATA_DIR=str(data_dir))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: data directory {data_dir} {reason}"


# --- serve advertises what it binds ---------------------------------------------------------


SERVE = [sys.executable, "-m", "fhir_gateway.cli", "serve"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(data_dir: Path, port: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SERVE, "--port", str(port), "--workers", "0", "--data-dir", str(data_dir)],
        env=_env(FHIR_GATEWAY_LOG_LEVEL="WARNING", **env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _get_when_up(proc: subprocess.Popen[str], url: str) -> requests.Response:
    for _ in range(600):
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"serve exited {proc.returncode}: {err[-2000:]}")
        try:
            return requests.get(url, timeout=2)
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def test_serve_advertises_the_port_it_binds(tmp_path: Path) -> None:
    """`serve --port P` without FHIR_GATEWAY_PUBLIC_BASE_URL: discovery and the
    CapabilityStatement name port P (they named 127.0.0.1:8080 whatever the bind)."""
    port = _free_port()
    proc = _serve(tmp_path / "data", port)
    try:
        base = f"http://127.0.0.1:{port}"
        smart = _get_when_up(proc, f"{base}/fhir/.well-known/smart-configuration").json()
        assert smart["token_endpoint"] == f"{base}/auth/token"
        assert smart["jwks_uri"] == f"{base}/.well-known/jwks.json"
        cap = requests.get(f"{base}/fhir/metadata", timeout=10).json()
        assert cap["implementation"]["url"] == f"{base}/fhir"
        token = cap["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"]
        assert token == f"{base}/auth/token"
    finally:
        err = _stop(proc)
    assert f"public base URL {base}" in err  # said once, not silent


def test_serve_uses_the_configured_public_base_url(tmp_path: Path) -> None:
    port = _free_port()
    proc = _serve(tmp_path / "data", port, FHIR_GATEWAY_PUBLIC_BASE_URL="https://gw.example.org/")
    try:
        url = f"http://127.0.0.1:{port}/fhir/.well-known/smart-configuration"
        smart = _get_when_up(proc, url).json()
        assert smart["token_endpoint"] == "https://gw.example.org/auth/token"
    finally:
        _stop(proc)


def test_serve_on_a_wildcard_address_needs_a_public_base_url(tmp_path: Path) -> None:
    r = subprocess.run(
        [*SERVE, "--host", "0.0.0.0", "--port", "1", "--data-dir", str(tmp_path / "data")],
        env=_env(FHIR_GATEWAY_AUTH__ALLOW_DEV_ISSUER_ON_PUBLIC_BIND="true"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: set FHIR_GATEWAY_PUBLIC_BASE_URL")
    assert "Traceback" not in r.stderr
