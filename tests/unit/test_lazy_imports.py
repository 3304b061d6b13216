"""What `serve` keeps out of memory until it is needed (issue 17: peak RSS under 200 MB).

A module imported at start stays in the process for its whole life. These are imported on first
use instead, and must stay so: Alembic (and Mako, and every SQL dialect it loads: ~11 MB of RSS)
only when a migration is pending; authlib (OIDC sign-in, ~3.5 MB) on the first sign-in; psycopg
(~9 MB) only by a process whose database is PostgreSQL (this test's is SQLite).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.script import ScriptDirectory

from fhir_gateway.store import open_store
from fhir_gateway.store.db import alembic_config, migration_heads, schema_is_current

ROOT = Path(__file__).resolve().parents[2]

# What `fhir-gateway serve` imports and runs at start: the app, the job handlers, the store.
SERVE_START = """
import sys
from fhir_gateway import cli, job_handlers
from fhir_gateway.app import create_app
from fhir_gateway.settings import Settings
from fhir_gateway.store import open_store
from fhir_gateway.store.db import schema_is_current

job_handlers.register_all()
store = open_store(sys.argv[1], migrate=True)
assert schema_is_current(store)
create_app(Settings(data_dir=sys.argv[2]), store=store, configure_logs=False)
lazy = {"alembic", "mako", "authlib", "psycopg"}
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in lazy)))
"""


def test_migration_heads_are_alembics() -> None:
    """The heads read from the migration files without Alembic are Alembic's own."""
    alembic_heads = set(ScriptDirectory.from_config(alembic_config("")).get_heads())
    assert migration_heads() == alembic_heads
    assert len(alembic_heads) == 1  # one line of migrations (the integrator re-chains)


def test_a_pending_migration_is_seen_and_run(tmp_path: Path) -> None:
    """A database one revision behind: not current, and `migrate` (Alembic) brings it up."""
    url = f"sqlite:///{tmp_path / 'g.db'}"
    scripts = ScriptDirectory.from_config(alembic_config(""))
    head = scripts.get_current_head()
    assert head is not None
    revision = scripts.get_revision(head)
    assert revision is not None
    previous = revision.down_revision
    assert isinstance(previous, str)
    command.upgrade(alembic_config(url), previous)
    store = open_store(url, migrate=False)
    assert not schema_is_current(store)
    store.migrate()
    assert schema_is_current(store)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [(head,)]
    store.dispose()


def test_serve_start_imports_no_alembic_authlib_nor_psycopg(tmp_path: Path) -> None:
    """On a SQLite database already at head, starting the service loads neither Alembic (its
    check reads the version table and the migration files), nor authlib (first sign-in only),
    nor psycopg (PostgreSQL's driver)."""
    url = f"sqlite:///{tmp_path / 'g.db'}"
    open_store(url).dispose()  # the first start migrated it
    out = subprocess.run(
        [sys.executable, "-c", SERVE_START, url, str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == []
