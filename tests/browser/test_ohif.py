"""OHIF Viewer 3.13 on the gateway, in headless Chromium: the reviewer opens a case's study and
sees pixels, same-origin with the session cookie, and from another origin with CORS."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Mount, Route

from fhir_gateway.api.viewer import ViewerFiles
from fhir_gateway.app import create_app
from fhir_gateway.sandbox.server import AppServer
from fhir_gateway.security import sessions
from fhir_gateway.settings import CorsSettings, Settings, ViewerSettings
from fhir_gateway.store import Store, open_store
from fhir_gateway.viewer import TOKEN_KEY, app_config_js
from tests.conftest import Tokens
from tests.image_cases import CT2, CT_SMALL, assign, load_cases, uid

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
MIN_STD = 8.0  # grey levels: a blank or flat viewport is ~0; a CT slice is far above
CANVAS = ".cornerstone-viewport-element canvas, [data-viewport-uid] canvas"


@dataclass
class Gateway:
    url: str
    store: Store
    tokens: Tokens
    case_id: str


def _gateway(settings: Settings, tokens: Tokens, tmp_path: Path) -> Iterator[Gateway]:
    store = open_store(settings.db_url)
    load_cases(store, settings, {"case-1": [*CT2, CT_SMALL]}, tmp_path / "pacs")
    app = create_app(settings, store=store, configure_logs=False)
    with AppServer(app) as server:
        assign(server.url, tokens.headers("admin", sub="op"), "case-1", "rev-1")
        yield Gateway(server.url, store, tokens, "case-1")
    store.dispose()


@pytest.fixture
def same_origin(
    settings: Settings, tokens: Tokens, tmp_path: Path, ohif_dir: Path
) -> Iterator[Gateway]:
    settings = settings.model_copy(update={"viewer": ViewerSettings(dir=ohif_dir)})
    yield from _gateway(settings, tokens, tmp_path)


def _viewport_std(page: Any, timeout_s: float = 90.0) -> tuple[float, bytes]:
    """Std-dev of the grey levels of the first viewport canvas, once it shows something."""
    deadline = time.monotonic() + timeout_s
    std, shot = 0.0, b""
    while time.monotonic() < deadline:
        canvas = page.locator(CANVAS).first
        if canvas.count() and canvas.is_visible():
            shot = canvas.screenshot()
            grey = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
            std = float(grey.std())
            if std > MIN_STD:
                return std, shot
        page.wait_for_timeout(500)
    return std, shot


def _open(page: Any, base: str, case_id: str, study: str) -> None:
    page.goto(f"{base}/viewer/viewer?StudyInstanceUIDs={study}&case={case_id}")


def test_reviewer_opens_the_case_study_in_ohif_same_origin(
    same_origin: Gateway, browser: Any
) -> None:
    gw = same_origin
    r = requests.post(f"{gw.url}/session", headers=gw.tokens.headers("reviewer", sub="rev-1"))
    assert r.status_code == 204, r.text
    cookie = r.cookies[sessions.COOKIE]
    set_cookie = r.headers["set-cookie"].lower()
    assert "httponly" in set_cookie
    assert "samesite=lax" in set_cookie
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_cookies(
        [{"name": sessions.COOKIE, "value": cookie, "url": gw.url, "httpOnly": True}]
    )
    page = context.new_page()
    failed: list[str] = []
    page.on(
        "response",
        lambda resp: failed.append(f"{resp.status} {resp.url}") if resp.status >= 400 else None,
    )
    _open(page, gw.url, gw.case_id, uid(CT_SMALL))
    std, _ = _viewport_std(page)
    page.screenshot(path=str(SHOTS / "ohif-same-origin.png"))
    context.close()
    assert std > MIN_STD, f"viewport blank (std {std:.1f}); failed requests: {failed[:10]}"
    assert failed == [], failed  # no DICOMweb error, no viewer asset missing under /viewer


def test_without_a_session_the_viewer_gets_no_images(same_origin: Gateway, browser: Any) -> None:
    gw = same_origin
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    statuses: list[int] = []
    page.on(
        "response", lambda resp: statuses.append(resp.status) if "/dicom-web/" in resp.url else None
    )
    _open(page, gw.url, gw.case_id, uid(CT_SMALL))
    std, _ = _viewport_std(page, timeout_s=15)
    context.close()
    assert std <= MIN_STD
    assert statuses, "the viewer made no DICOMweb request"
    assert set(statuses) == {401}, statuses


def _external_viewer(ohif_dir: Path, gateway_url: str) -> Starlette:
    """OHIF served by a second server (another origin), configured for the gateway's URL."""
    config = app_config_js(gateway_url)

    def app_config(_request: Any) -> Response:
        return Response(config, media_type="text/javascript")

    return Starlette(
        routes=[
            Route("/viewer/app-config.js", app_config),
            Mount("/viewer", ViewerFiles(ohif_dir)),
        ]
    )


@pytest.mark.parametrize("cors", [True, False], ids=["cors-configured", "no-cors"])
def test_ohif_from_another_origin_needs_cors(
    cors: bool, settings: Settings, tokens: Tokens, tmp_path: Path, ohif_dir: Path, browser: Any
) -> None:
    with AppServer(_external_viewer(ohif_dir, "http://127.0.0.1:0")) as probe:
        origin = f"http://localhost:{probe.port}"
    viewer_port = probe.port
    cors_settings = CorsSettings(allow_origins=[origin] if cors else [])
    settings = settings.model_copy(update={"cors": cors_settings})
    errors: list[str] = []
    for gw in _gateway(settings, tokens, tmp_path):
        external = _external_viewer(ohif_dir, gw.url)
        with AppServer(external, port=viewer_port):
            token = tokens.headers("reviewer", sub="rev-1")["Authorization"].split(" ", 1)[1]
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.add_init_script(f"window.sessionStorage.setItem({TOKEN_KEY!r}, {token!r});")
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            _open(page, origin, gw.case_id, uid(CT_SMALL))
            std, _ = _viewport_std(page, timeout_s=90 if cors else 20)
            if cors:
                page.screenshot(path=str(SHOTS / "ohif-cross-origin.png"))
            context.close()
        if cors:
            assert std > MIN_STD, f"viewport blank (std {std:.1f}): {errors[:5]}"
        else:
            assert std <= MIN_STD
            assert any("CORS" in e or "Access-Control" in e for e in errors), errors[:5]
