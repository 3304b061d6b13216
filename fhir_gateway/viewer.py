"""The OHIF viewer: install its built files from npm and configure them for the gateway.

`fhir-gateway viewer install [--dir D]` runs `npm pack @ohif/app@3.13` (the package ships a
built `dist/`; `npm install` would also fetch its ~1,500 build-time dependencies, which a built
viewer never loads), extracts `dist/` and the licence into D (default `<data_dir>/viewer`),
and writes `app-config.js` for the gateway. The API serves D at `/viewer` (`api/viewer.py`).

OHIF's published build is made for the site root (`PUBLIC_URL=/`). OHIF's own documentation
serves it under a path by rebuilding with another `PUBLIC_URL`; we set the same value in the
built files instead: `window.PUBLIC_URL` and the absolute `src`/`href` in `index.html`,
webpack's public path (`__webpack_require__.p = "/"`) in the bundles that carry one, and the
root-relative `url(/...)` of fonts in the CSS. Each
replacement is checked (the install fails if the build no longer has what we replace), and
nothing else in OHIF is changed: configure it, don't fork it.

`app-config.js`: one DICOMweb data source whose roots are the case's own per-case DICOMweb,
read from the page URL (`/viewer/viewer?StudyInstanceUIDs=<uid>&case=<case id>`); the study
list is off (a reviewer opens a case's study from the case, never browses the archive);
thumbnails come from our `/thumbnail` resources. Same origin, the browser sends the reviewer's
session cookie (`security/sessions.py`) with every request; with `gateway_url` (a viewer served
from another origin, CORS configured on the gateway) the requests carry
`Authorization: Bearer <token>` read from the page's `sessionStorage["fhir-gateway.token"]`,
which the hosting page puts there: never a URL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fhir_gateway.errors import ConfigError

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13"  # npm range: the newest 3.13.x
MOUNT = "/viewer"
VERSION_FILE = "fhir-gateway-viewer.json"
TOKEN_KEY = "fhir-gateway.token"  # sessionStorage key for an external viewer's bearer token
CASE_KEY = "fhir-gateway.case"
_PUBLIC_PATH = '__webpack_require__.p = "/";'


@dataclass(frozen=True)
class Installed:
    """What `install` put where."""

    directory: Path
    version: str
    integrity: str
    files: int
    bytes: int


def installed_version(directory: Path) -> str | None:
    """The OHIF version installed in `directory`, or None."""
    try:
        return str(json.loads((directory / VERSION_FILE).read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def install(
    directory: Path,
    *,
    version: str = OHIF_VERSION,
    gateway_url: str | None = None,
    npm: str = "npm",
) -> Installed:
    """Fetch OHIF with `npm pack`, put its `dist/` in `directory` for `/viewer`, configure it.

    The new files are assembled beside `directory` and swapped in at the end, so a failed
    install leaves the previous one in place.

    Raises:
        ConfigError: npm missing or failing, or a build whose files are not as expected.
    """
    if shutil.which(npm) is None:
        raise ConfigError(f"{npm} not found: Node.js and npm are needed to install the viewer")
    directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ohif-", dir=directory.parent) as tmp:
        work = Path(tmp)
        spec = f"{OHIF_PACKAGE}@{version}"
        done = subprocess.run(
            [npm, "pack", spec, "--json", "--pack-destination", str(work)],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"npm pack {spec} failed: {last}")
        try:
            packed = json.loads(done.stdout)[0]
            tarball = work / packed["filename"]
        except (ValueError, KeyError, IndexError) as exc:
            raise ConfigError(f"npm pack {spec} gave no tarball name") from exc
        stage = work / "stage"
        stage.mkdir()
        _extract_dist(tarball, stage)
        patch_public_path(stage, MOUNT + "/")
        (stage / "app-config.js").write_text(app_config_js(gateway_url), encoding="utf-8")
        meta = {
            "package": OHIF_PACKAGE,
            "version": packed.get("version", ""),
            "integrity": packed.get("integrity", ""),
            "mount": MOUNT,
            "gateway_url": gateway_url,
        }
        (stage / VERSION_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        old = work / "old"
        if directory.exists():
            directory.rename(old)
        stage.rename(directory)
    sizes = [p.stat().st_size for p in directory.rglob("*") if p.is_file()]
    return Installed(directory, meta["version"], meta["integrity"], len(sizes), sum(sizes))


def _extract_dist(tarball: Path, stage: Path) -> None:
    """`package/dist/**` and `package/LICENSE` of the npm tarball into `stage`."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith("package/dist/") and (m.isfile() or m.isdir()):
                m.name = m.name.removeprefix("package/dist/")
                members.append(m)
            elif m.name == "package/LICENSE" and m.isfile():
                m.name = "LICENSE-OHIF"
                members.append(m)
        if not any(m.name == "index.html" for m in members):
            raise ConfigError(f"{tarball.name} has no dist/index.html: not a built OHIF")
        tar.extractall(stage, members=members, filter="data")


def patch_public_path(root: Path, public_url: str) -> int:
    """Serve the root-built OHIF under `public_url` (e.g. "/viewer/"); files changed.

    Raises:
        ConfigError: `index.html` or the bundles do not have the values OHIF 3.13 builds with.
    """
    index = root / "index.html"
    html = index.read_text(encoding="utf-8")
    if 'window.PUBLIC_URL="/"' not in html:
        raise ConfigError('OHIF index.html does not set window.PUBLIC_URL="/" as expected')
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{public_url}"')
    html = re.sub(r'(src|href)="/(?!/)', rf'\1="{public_url}', html)
    index.write_text(html, encoding="utf-8")
    changed = 1
    for js in sorted(root.glob("*.js")):
        text = js.read_text(encoding="utf-8", errors="surrogateescape")
        if _PUBLIC_PATH in text:
            new = text.replace(_PUBLIC_PATH, f'__webpack_require__.p = "{public_url}";')
            js.write_text(new, encoding="utf-8", errors="surrogateescape")
            changed += 1
    if changed == 1:
        raise ConfigError("no OHIF bundle sets webpack's public path as expected")
    for css in sorted(root.glob("*.css")):  # fonts: url(/<hash>.woff2)
        text = css.read_text(encoding="utf-8", errors="surrogateescape")
        new = re.sub(r"url\((['\"]?)/(?!/)", rf"url(\1{public_url}", text)
        if new != text:
            css.write_text(new, encoding="utf-8", errors="surrogateescape")
            changed += 1
    return changed


def app_config_js(gateway_url: str | None = None) -> str:
    """OHIF's `window.config` for the gateway (see the module docstring)."""
    base = json.dumps(gateway_url.rstrip("/")) if gateway_url else "window.location.origin"
    # OHIF's DICOMweb data source takes its Authorization header from the user authentication
    # service only; a config given as a function receives the services manager, and the
    # service's documented `setServiceImplementation` plugs the header in once it exists.
    hook = (
        f"""
  var config = window.config;
  window.config = Object.assign(function (ctx) {{
    (function plug() {{
      var auth = ctx.servicesManager.services.userAuthenticationService;
      if (!auth) {{
        return setTimeout(plug, 0);
      }}
      auth.setServiceImplementation({{
        getAuthorizationHeader: function () {{
          var token = window.sessionStorage.getItem({json.dumps(TOKEN_KEY)});
          return token ? {{ Authorization: 'Bearer ' + token }} : {{}};
        }},
      }});
    }})();
    return config;
  }}, config);"""
        if gateway_url
        else ""
    )
    return f"""/* Written by `fhir-gateway viewer install`; rewritten on every install.
 * OHIF reads one case's images from the gateway's per-case DICOMweb. Open
 *   {MOUNT}/viewer?StudyInstanceUIDs=<study uid>&case=<case id>
 * {
        "Requests carry the bearer token the hosting page put in sessionStorage."
        if gateway_url
        else "Same origin: the browser sends the reviewer's session cookie with each request."
    }
 */
(function () {{
  var params = new URLSearchParams(window.location.search);
  var caseId = params.get('case');
  if (caseId) {{
    window.sessionStorage.setItem({json.dumps(CASE_KEY)}, caseId);
  }} else {{
    caseId = window.sessionStorage.getItem({json.dumps(CASE_KEY)}) || '';
  }}
  var root = {base} + '/cases/' + encodeURIComponent(caseId) + '/dicom-web';
  window.config = {{
    routerBasename: {json.dumps(MOUNT)},
    extensions: [],
    modes: [],
    customizationService: {{}},
    showStudyList: false,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    investigationalUseDialog: {{ option: 'never' }},
    maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
    showErrorDetails: 'always',
    defaultDataSourceName: 'gateway',
    dataSources: [
      {{
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'gateway',
        configuration: {{
          friendlyName: 'fhir-gateway case images',
          name: 'gateway',
          qidoRoot: root,
          wadoRoot: root,
          wadoUriRoot: root,
          qidoSupportsIncludeField: true,
          imageRendering: 'wadors',
          thumbnailRendering: 'thumbnail',
          thumbnailRequestStrategy: 'fetch',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          bulkDataURI: {{ enabled: false }},
          omitQuotationForMultipartRequest: true,
        }},
      }},
    ],
  }};{hook}
}})();
"""
