"""Readiness: can this process serve and work now? (`GET /ready`; `/health` is liveness only.)

An edge module like `app.py`: it asks each part that must be in order (database reachable,
migrations current, partners file valid as it is on disk now, report fonts found, image store
writable) and says which failed. Reasons go to the log, not to the (unauthenticated) caller.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy import text

from fhir_gateway.errors import ConfigError, GatewayError
from fhir_gateway.imaging.store import writable_dirs
from fhir_gateway.reports.fonts import find_report_fonts
from fhir_gateway.settings import Settings, load_partners
from fhir_gateway.store import Store
from fhir_gateway.store.db import schema_is_current

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    reason: str | None = None  # for the log only


def check_all(store: Store, settings: Settings) -> list[Check]:
    """Every check, in order; a check that cannot run (the database is down) fails too."""
    checks: list[tuple[str, Callable[[], None]]] = [
        ("database", lambda: _database(store)),
        ("migrations", lambda: _migrations(store)),
        ("partners", lambda: _partners(settings)),
        ("report_fonts", lambda: _fonts(settings)),
        ("image_store", lambda: _image_store(settings)),
    ]
    results = []
    for name, run in checks:
        try:
            run()
        except Exception as exc:  # whatever fails, the answer is "not ready"
            reason = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            results.append(Check(name, False, reason))
            log.warning("ready.check.failed", check=name, error=type(exc).__name__)
        else:
            results.append(Check(name, True))
    return results


def _database(store: Store) -> None:
    with store.session() as s:
        s.execute(text("SELECT 1"))


def _migrations(store: Store) -> None:
    if not schema_is_current(store):
        raise ConfigError("database schema is not at the newest migration")


def _partners(settings: Settings) -> None:
    path = settings.partners_file
    if path is None:
        default = settings.data_dir / "partners.toml"
        path = default if default.exists() else None
    load_partners(path)  # as a restart would read it


def _fonts(settings: Settings) -> None:
    cfg = settings.reports
    find_report_fonts(regular=cfg.font_regular, bold=cfg.font_bold, fallbacks=cfg.font_fallbacks)


def _image_store(settings: Settings) -> None:
    for directory in writable_dirs(settings.data_dir, settings.images.backend):
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".ready-")
        os.close(fd)
        os.unlink(probe)
