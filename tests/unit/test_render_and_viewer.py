"""Rendering rules (PS3.3 C.11.2.1.2 windows, PS3.18 §8.3.5 parameters) and the OHIF install's
public-path setting, on synthetic inputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fhir_gateway.errors import ConfigError, InputError, NotAcceptableError
from fhir_gateway.imaging.render import (
    JPEG,
    PNG,
    Window,
    apply_window,
    choose_media_type,
    parse_viewport,
    parse_window,
)
from fhir_gateway.viewer import _extract_dist, app_config_js, patch_public_path


def test_linear_window_matches_the_standard_formula() -> None:
    values = np.array([-1000.0, -160.5, -160.0, 39.5, 40.0, 239.0, 239.5, 3000.0])
    out = apply_window(values, Window(40, 400))
    assert out.tolist() == [0, 0, 0, 128, 128, 255, 255, 255]
    assert apply_window(np.array([39.0, 40.0]), Window(40, 1)).tolist() == [0, 255]


def test_sigmoid_and_linear_exact_windows() -> None:
    v = np.array([40.0])
    assert apply_window(v, Window(40, 400, "sigmoid")).tolist() == [128]
    assert apply_window(np.array([-160.0, 240.0]), Window(40, 400, "linear-exact")).tolist() == [
        0,
        255,
    ]


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("", JPEG),
        ("*/*", JPEG),
        ("image/png", PNG),
        ("image/png;q=0.5, image/jpeg", JPEG),
        ("image/jpeg;q=0.2, image/png;q=0.9", PNG),
        ("image/gif, image/*;q=0.1", JPEG),
    ],
)
def test_media_type_negotiation(accept: str, chosen: str) -> None:
    assert choose_media_type(accept) == chosen


def test_unservable_media_types() -> None:
    with pytest.raises(NotAcceptableError):
        choose_media_type("image/gif")
    with pytest.raises(NotAcceptableError):
        choose_media_type("image/png;q=0")


@pytest.mark.parametrize("value", ["1", "a,b", "1,-5", "1,2,3,4", "1,2,box", "nan,4", "1,inf"])
def test_bad_windows(value: str) -> None:
    with pytest.raises(InputError) as err:
        parse_window(value)
    assert value not in str(err.value)


def test_viewport_and_window_parse() -> None:
    assert parse_window("40, 400, SIGMOID") == Window(40, 400, "sigmoid")
    assert parse_viewport("512,256") == (512, 256)
    with pytest.raises(InputError):
        parse_viewport("99999,1")


def _mini_build(root: Path) -> Path:
    """A tarball shaped like npm's @ohif/app: package/dist with a root-built index and bundle."""
    files = {
        "package/dist/index.html": '<script>window.PUBLIC_URL="/"</script>'
        '<script src="/app-config.js"></script><link href="/assets/x.css">'
        '<script src="/app.bundle.1.js"></script><a href="//cdn.example/x">',
        "package/dist/app.bundle.1.js": 'x(); __webpack_require__.p = "/"; y();',
        "package/dist/other.js": "no public path here",
        "package/dist/app.bundle.css": "@font-face{src:url(/f1.woff2)} a{b:url('//cdn/x')}",
        "package/LICENSE": "MIT",
        "package/package.json": "{}",
    }
    tgz = root / "ohif.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tgz


def test_install_extracts_dist_and_serves_it_under_viewer(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    _extract_dist(_mini_build(tmp_path), stage)
    assert sorted(p.name for p in stage.iterdir()) == [
        "LICENSE-OHIF",
        "app.bundle.1.js",
        "app.bundle.css",
        "index.html",
        "other.js",
    ]
    assert patch_public_path(stage, "/viewer/") == 3
    html = (stage / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in html
    assert 'src="/viewer/app-config.js"' in html
    assert 'href="/viewer/assets/x.css"' in html
    assert 'href="//cdn.example/x"' in html  # protocol-relative URLs untouched
    assert '__webpack_require__.p = "/viewer/"' in (stage / "app.bundle.1.js").read_text()
    css = (stage / "app.bundle.css").read_text()
    assert "url(/viewer/f1.woff2)" in css
    assert "url('//cdn/x')" in css


def test_install_refuses_a_build_it_does_not_recognise(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<script>window.PUBLIC_URL='/x/'</script>")
    with pytest.raises(ConfigError, match="PUBLIC_URL"):
        patch_public_path(tmp_path, "/viewer/")


def test_app_config_points_at_the_case_dicomweb_without_tokens() -> None:
    same = app_config_js()
    assert "window.location.origin + '/cases/'" in same
    assert "showStudyList: false" in same
    assert "thumbnailRendering: 'thumbnail'" in same
    assert "Bearer" not in same
    external = app_config_js("https://gateway.example/")
    assert json.dumps("https://gateway.example") + " + '/cases/'" in external
    assert 'sessionStorage.getItem("fhir-gateway.token")' in external
