"""A throwaway PostgreSQL cluster on a free loopback port (initdb + pg_ctl), for store tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fhir_gateway.sandbox.server import free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def require_servers() -> bool:
    return os.environ.get("FHIR_GATEWAY_REQUIRE_SERVERS") == "1"


def skip_or_fail(reason: str) -> None:
    if require_servers():
        pytest.fail(f"{reason} (FHIR_GATEWAY_REQUIRE_SERVERS=1)")
    pytest.skip(reason)


def _pg_bin(name: str) -> str | None:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    return shutil.which(name)


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster; yield a SQLAlchemy URL; stop and delete it afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        raise AssertionError("unreachable")
    root = Path(tempfile.mkdtemp(prefix="fhir-gateway-pg-"))
    data = root / "data"
    env = dict(os.environ)
    user_args: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as the unprivileged `postgres` user.
        shutil.chown(root, "postgres")
        user_args = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [
            *user_args,
            initdb,
            "-D",
            str(data),
            "-U",
            "gateway",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    log = root / "pg.log"
    subprocess.run(
        [
            *user_args,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=100",
            "start",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        subprocess.run(
            [
                *user_args,
                _pg_bin("createdb") or "createdb",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "gateway",
                "gateway",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg://gateway@127.0.0.1:{port}/gateway"
    finally:
        subprocess.run(
            [*user_args, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)
