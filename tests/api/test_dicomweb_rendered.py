"""Rendered images and thumbnails on the per-case DICOMweb (PS3.18 §8.3.5, §9.5; DW-10, DW-16),
the browser session cookie, CORS for an external viewer, and `/viewer`.

Images are pulled into the cases the production way (sandbox PACS over loopback DICOMweb);
responses are decoded with Pillow and compared with pydicom's own pixel values.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import JPEGLSLossless, generate_uid
from sqlalchemy import select

from fhir_gateway.app import create_app
from fhir_gateway.security import sessions
from fhir_gateway.settings import CorsSettings, Settings, ViewerSettings
from fhir_gateway.store import Store, open_store
from fhir_gateway.store.models import AuditRow
from tests.conftest import Tokens
from tests.image_cases import CT2, CT_SMALL, MR_RLE, load_cases, uid

VIEWER_ORIGIN = "http://viewer.example:8443"


@dataclass
class World:
    http: TestClient
    store: Store
    tokens: Tokens
    undecodable: Path

    def rev(self, sub: str = "rev-1", **extra: str) -> dict[str, str]:
        return self.tokens.headers("reviewer", sub=sub, **extra)


def instance_url(path: Path, case_id: str = "case-1") -> str:
    st, se, sop = (
        uid(path, a) for a in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    return f"/cases/{case_id}/dicom-web/studies/{st}/series/{se}/instances/{sop}"


def _undecodable(tmp_path: Path) -> Path:
    """MR_small_RLE relabelled JPEG-LS Lossless: encapsulated pixel data no installed
    decoder reads (pydicom needs pylibjpeg/pyjpegls for JPEG-LS), in a study of its own."""
    ds = pydicom.dcmread(MR_RLE)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = tmp_path / "jpegls.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture
def world(settings: Settings, tokens: Tokens, tmp_path: Path) -> Iterator[World]:
    odd = _undecodable(tmp_path)
    viewer_dir = tmp_path / "ohif"
    viewer_dir.mkdir()
    (viewer_dir / "index.html").write_text("<!doctype html><title>OHIF</title>")
    (viewer_dir / "app-config.js").write_text("window.config = {};")
    settings = settings.model_copy(
        update={
            "cors": CorsSettings(allow_origins=[VIEWER_ORIGIN]),
            "viewer": ViewerSettings(dir=viewer_dir),
        }
    )
    store = open_store(settings.db_url)
    load_cases(
        store,
        settings,
        {"case-1": [*CT2, CT_SMALL, MR_RLE, odd], "case-2": [CT_SMALL]},
        tmp_path / "pacs",
    )
    with TestClient(create_app(settings, store=store, configure_logs=False)) as http:
        r = http.post(
            "/cases/case-1/assignments",
            json={"reviewer": "rev-1"},
            headers=tokens.headers("admin", sub="op"),
        )
        assert r.status_code == 201, r.text
        yield World(http, store, tokens, odd)
    store.dispose()


def image(resp: object) -> Image.Image:
    return Image.open(io.BytesIO(resp.content))  # type: ignore[attr-defined]


def audit_rows(store: Store, action: str) -> list[AuditRow]:
    with store.session() as s:
        rows = list(s.scalars(select(AuditRow).where(AuditRow.action == action)))
        s.expunge_all()
        return rows


# --- rendered ------------------------------------------------------------------------------


def test_rendered_png_applies_the_requested_window_to_modality_values(world: World) -> None:
    ds = pydicom.dcmread(CT_SMALL)
    hu = apply_modality_lut(ds.pixel_array, ds)
    r = world.http.get(
        f"{instance_url(CT_SMALL)}/rendered?window=40,400",
        headers=world.rev(Accept="image/png"),
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = image(r)
    assert img.format == "PNG"
    assert img.size == (ds.Columns, ds.Rows)
    px = np.asarray(img)
    # PS3.3 C.11.2.1.2.1, c=40 w=400: below -160 black, above 239 white, linear between.
    assert (px[hu <= -160.5] == 0).all()
    assert (px[hu > 239.5] == 255).all()
    inside = (hu > -150) & (hu < 230)
    expected = np.clip(np.rint(((hu - 39.5) / 399 + 0.5) * 255), 0, 255)
    assert inside.sum() > 1000
    assert np.abs(px[inside].astype(int) - expected[inside]).max() <= 1
    rows = audit_rows(world.store, "images.retrieve")
    assert [row.case_id for row in rows] == ["case-1"]
    assert f"urn:oid:{ds.SOPInstanceUID}" in rows[0].entity


def test_dataset_window_is_the_default_and_a_narrow_window_thresholds(world: World) -> None:
    url = f"{instance_url(CT2[0])}/rendered"
    default = np.asarray(image(world.http.get(url, headers=world.rev(Accept="image/png"))))
    ds = pydicom.dcmread(CT2[0])
    c, w = (
        float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter),
        float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth),
    )
    same = world.http.get(f"{url}?window={c},{w}", headers=world.rev(Accept="image/png"))
    assert np.array_equal(np.asarray(image(same)), default)
    narrow = world.http.get(f"{url}?window={c},1", headers=world.rev(Accept="image/png"))
    assert set(np.unique(np.asarray(image(narrow))).tolist()) <= {0, 255}
    assert not np.array_equal(np.asarray(image(narrow)), default)


def test_rendered_jpeg_is_the_default_and_viewport_scales(world: World) -> None:
    url = f"{instance_url(CT_SMALL)}/rendered"
    r = world.http.get(url, headers=world.rev())
    assert r.headers["content-type"] == "image/jpeg"
    assert image(r).format == "JPEG"
    assert image(r).size == (128, 128)
    small = world.http.get(f"{url}?viewport=64,32&quality=50", headers=world.rev(Accept="*/*"))
    assert image(small).size == (32, 32)
    frame = world.http.get(
        f"{url.removesuffix('/rendered')}/frames/1/rendered", headers=world.rev()
    )
    assert frame.status_code == 200
    assert image(frame).size == (128, 128)


def test_rle_compressed_pixel_data_is_decoded(world: World) -> None:
    r = world.http.get(f"{instance_url(MR_RLE)}/rendered", headers=world.rev(Accept="image/png"))
    assert r.status_code == 200, r.text
    ds = pydicom.dcmread(MR_RLE)
    assert image(r).size == (ds.Columns, ds.Rows)
    assert np.asarray(image(r)).std() > 10


@pytest.mark.parametrize(
    ("query", "accept", "status", "expression"),
    [
        ("window=40", "image/png", 400, "window"),
        ("window=40,0", "image/png", 400, "window"),
        ("window=40,400,cubic", "image/png", 400, "window"),
        ("viewport=0,10", "image/png", 400, "viewport"),
        ("quality=101", "image/jpeg", 400, "quality"),
        ("", "image/gif", 406, None),
        ("accept=image/gif", "image/png", 406, None),
    ],
)
def test_bad_rendered_requests_get_an_outcome_naming_the_rule(
    world: World, query: str, accept: str, status: int, expression: str | None
) -> None:
    before = len(audit_rows(world.store, "images.retrieve"))
    r = world.http.get(
        f"{instance_url(CT_SMALL)}/rendered?{query}", headers=world.rev(Accept=accept)
    )
    assert r.status_code == status, r.text
    issue = r.json()["issue"][0]
    if expression:
        assert issue["expression"] == [expression]
        assert expression in issue["diagnostics"]
    assert "cubic" not in issue["diagnostics"]
    assert len(audit_rows(world.store, "images.retrieve")) == before


def test_undecodable_compressed_pixel_data_is_406_saying_why(world: World) -> None:
    r = world.http.get(f"{instance_url(world.undecodable)}/rendered", headers=world.rev())
    assert r.status_code == 406, r.text
    assert "JPEG-LS Lossless" in r.json()["issue"][0]["diagnostics"]


def test_frame_out_of_range_and_bad_frame_list(world: World) -> None:
    base = instance_url(CT_SMALL)
    assert world.http.get(f"{base}/frames/2/rendered", headers=world.rev()).status_code == 404
    assert world.http.get(f"{base}/frames/1,2/rendered", headers=world.rev()).status_code == 400


# --- thumbnails ----------------------------------------------------------------------------


def test_thumbnails_of_study_series_instance_and_frame(world: World) -> None:
    st, se = uid(CT2[0]), uid(CT2[0], "SeriesInstanceUID")
    root = "/cases/case-1/dicom-web"
    for url in (
        f"{root}/studies/{st}/thumbnail",
        f"{root}/studies/{st}/series/{se}/thumbnail",
        f"{instance_url(CT2[0])}/thumbnail",
        f"{instance_url(CT_SMALL)}/frames/1/thumbnail",
    ):
        r = world.http.get(url, headers=world.rev())
        assert r.status_code == 200, (url, r.text)
        assert r.headers["content-type"] == "image/jpeg"
        assert max(image(r).size) == 128
    png = world.http.get(
        f"{instance_url(CT_SMALL)}/thumbnail", headers=world.rev(Accept="image/png")
    )
    assert image(png).format == "PNG"


def test_series_thumbnail_is_the_middle_instance(world: World) -> None:
    se = uid(CT2[0], "SeriesInstanceUID")
    by_number = sorted(
        CT2, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
    )
    middle = by_number[len(by_number) // 2]
    series = world.http.get(
        f"/cases/case-1/dicom-web/studies/{uid(CT2[0])}/series/{se}/thumbnail",
        headers=world.rev(Accept="image/png"),
    )
    one = world.http.get(f"{instance_url(middle)}/thumbnail", headers=world.rev(Accept="image/png"))
    assert series.content == one.content


# --- access --------------------------------------------------------------------------------


def test_rendered_and_thumbnail_need_case_access(world: World) -> None:
    url = f"{instance_url(CT_SMALL)}/rendered"
    assert world.http.get(url).status_code == 401
    assert world.http.get(url, headers=world.rev("rev-2")).status_code == 403
    other = f"{instance_url(CT_SMALL, 'case-2')}/thumbnail"
    assert world.http.get(other, headers=world.rev()).status_code == 403
    ehr = world.tokens.headers("ehr")
    assert world.http.get(url, headers=ehr).status_code == 403
    missing = f"/cases/case-1/dicom-web/studies/{generate_uid()}/thumbnail"
    assert world.http.get(missing, headers=world.rev()).status_code == 404
    assert audit_rows(world.store, "images.retrieve") == []


def test_session_cookie_reads_images_for_get_only(world: World) -> None:
    r = world.http.post("/session", headers=world.rev())
    assert r.status_code == 204
    cookie = r.cookies[sessions.COOKIE]
    world.http.cookies.clear()
    jar = {sessions.COOKIE: cookie}
    url = f"{instance_url(CT_SMALL)}/thumbnail"
    world.http.cookies.update(jar)
    assert world.http.get(url).status_code == 200
    assert world.http.get("/cases/case-1/dicom-web/studies").status_code == 200
    other = world.http.get(f"{instance_url(CT_SMALL, 'case-2')}/thumbnail")
    assert other.status_code == 403
    # The session is for reads: a write with only the cookie is unauthenticated.
    post = world.http.post("/cases/case-1/assignments", json={"reviewer": "rev-9"})
    assert post.status_code == 401
    world.http.cookies.clear()
    world.http.cookies.update({sessions.COOKIE: cookie[:-4] + "AAAA"})
    forged = world.http.get(url)
    assert forged.status_code == 401
    assert cookie[:-4] not in forged.text
    world.http.cookies.clear()
    assert world.http.delete("/session").status_code == 204


def test_partner_systems_get_no_browser_session(world: World) -> None:
    r = world.http.post("/session", headers=world.tokens.headers("ehr"))
    assert r.status_code == 403
    assert sessions.COOKIE not in r.cookies


# --- CORS ----------------------------------------------------------------------------------


def test_cors_preflight_on_dicomweb_for_the_configured_origin(world: World) -> None:
    url = f"{instance_url(CT_SMALL)}/frames/1"
    pre = {
        "Origin": VIEWER_ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization,accept",
    }
    ok = world.http.options(url, headers=pre)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == VIEWER_ORIGIN
    assert "GET" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in ok.headers
    bad = world.http.options(url, headers={**pre, "Origin": "http://evil.example"})
    assert bad.status_code == 400
    assert "access-control-allow-origin" not in bad.headers
    get = world.http.get("/cases/case-1/dicom-web/studies", headers=world.rev(Origin=VIEWER_ORIGIN))
    assert get.headers["access-control-allow-origin"] == VIEWER_ORIGIN
    assert "warning" in get.headers["access-control-expose-headers"].lower()
    # Only the DICOMweb paths: the FHIR API is not opened to the viewer's origin.
    fhir = world.http.options("/fhir/Task", headers=pre)
    assert fhir.status_code == 405
    assert "access-control-allow-origin" not in fhir.headers
    meta = world.http.get("/fhir/metadata").json()
    assert meta["rest"][0]["security"]["cors"] is True


def test_without_cors_settings_preflight_is_refused(client: TestClient) -> None:
    r = client.options(
        "/cases/case-1/dicom-web/studies",
        headers={"Origin": VIEWER_ORIGIN, "Access-Control-Request-Method": "GET"},
    )
    assert r.status_code == 405
    assert "access-control-allow-origin" not in r.headers
    assert client.get("/fhir/metadata").json()["rest"][0]["security"]["cors"] is False


def test_cors_origins_are_checked_in_settings() -> None:
    with pytest.raises(ValueError, match="origins"):
        CorsSettings(allow_origins=["https://viewer.example/path"])
    with pytest.raises(ValueError, match="origins"):
        CorsSettings(allow_origins=["*"])


# --- /viewer -------------------------------------------------------------------------------


def test_viewer_routes_fall_back_to_index_html(world: World) -> None:
    for path in ("/viewer/", "/viewer/viewer", "/viewer/viewer/dicomweb"):
        r = world.http.get(path)
        assert r.status_code == 200, path
        assert "<title>OHIF</title>" in r.text
    assert world.http.get("/viewer/app-config.js").text == "window.config = {};"
    assert world.http.get("/viewer/missing.bundle.js").status_code == 404
    assert world.http.get("/viewer/../gateway.db").status_code == 404


def test_viewer_not_installed_says_how(client: TestClient) -> None:
    r = client.get("/viewer/viewer")
    assert r.status_code == 404
    assert "fhir-gateway viewer install" in r.json()["issue"][0]["diagnostics"]
