"""Medplum's FHIR engine (@medplum/fhir-router + MemoryRepository) under Node on a loopback port.

The wrapper is tests/servers/medplum/server.mjs (FHIR base `/fhir/R4`, no auth). Unavailable
(Node or the npm packages missing and not installable) -> the test is skipped with the reason,
unless FHIR_GATEWAY_REQUIRE_SERVERS=1 (then it fails).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MEDPLUM = Path(__file__).resolve().parent / "medplum"


def _unavailable(reason: str) -> None:
    if os.environ.get("FHIR_GATEWAY_REQUIRE_SERVERS") == "1":
        pytest.fail(f"Medplum server required but unavailable: {reason}")
    pytest.skip(reason)


@contextmanager
def medplum_server() -> Iterator[str]:
    """Start the server (installing its npm packages first if needed); yield its FHIR base."""
    node = shutil.which("node")
    if node is None:
        _unavailable("node is not installed")
        raise AssertionError("unreachable")
    if not (MEDPLUM / "node_modules" / "@medplum" / "fhir-router").is_dir():
        if shutil.which("npm") is None:
            _unavailable("npm packages missing and npm not installed (run install.sh)")
        done = subprocess.run(
            ["sh", str(MEDPLUM / "install.sh")], capture_output=True, timeout=600, check=False
        )
        if done.returncode != 0:
            _unavailable(f"install.sh failed: {done.stderr.decode(errors='replace')[-300:]}")
    proc = subprocess.Popen(
        [node, "--experimental-websocket", "server.mjs", "0"],
        cwd=MEDPLUM,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until "LISTENING <port>" or exit
        if not line.startswith("LISTENING"):
            err = proc.stderr.read() if proc.stderr else ""
            _unavailable(f"Medplum server did not start: {err[-300:]}")
        yield f"http://127.0.0.1:{int(line.split()[1])}/fhir/R4"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
