"""Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright for Python, no browser
download) and the installed OHIF viewer. Tests here are marked `browser`: skipped when either is
missing, failed instead when FHIR_GATEWAY_REQUIRE_SERVERS=1 (CI installs both)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhir_gateway.viewer import installed_version

CHROMIUM = os.environ.get("FHIR_GATEWAY_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OHIF = ROOT / ".cache" / "ohif"  # where .ci/run installs it


def _missing(reason: str) -> None:
    if os.environ.get("FHIR_GATEWAY_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (FHIR_GATEWAY_REQUIRE_SERVERS=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ohif_dir() -> Path:
    """The OHIF install the tests serve (FHIR_GATEWAY_VIEWER__DIR, else .cache/ohif)."""
    d = Path(os.environ.get("FHIR_GATEWAY_VIEWER__DIR") or DEFAULT_OHIF)
    if installed_version(d) is None:
        _missing(f"OHIF not installed in {d}: run `fhir-gateway viewer install --dir {d}`")
    return d


# Module scope: Playwright's sync API runs an event loop in this thread while it is open, and
# later tests that run their own asyncio loop here (the MLLP client) must not find it running.
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        _missing(f"chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright (PyPI) is not installed")
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
        )
        yield b
        b.close()
