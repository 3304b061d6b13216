"""Find the TrueType fonts the report PDF needs (file system look-up, kept out of the mappers).

Defaults are the Debian packages `fonts-dejavu-core` (Latin, Greek, Cyrillic; Bitstream Vera /
public-domain licence) and `fonts-droid-fallback` (CJK; Apache-2.0). Either can be replaced by
explicit paths (settings `reports.font_regular`, `reports.font_bold`, `reports.font_fallbacks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fhir_gateway.errors import ConfigError
from mappers.report_pdf import PdfFonts

FONT_DIRS = (
    Path("/usr/share/fonts/truetype"),
    Path("/usr/share/fonts"),
    Path("/usr/local/share/fonts"),
)
REGULAR = ("dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")
BOLD = ("dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf")
CJK = ("droid/DroidSansFallbackFull.ttf", "DroidSansFallbackFull.ttf")


def find_report_fonts(
    *,
    regular: Path | None = None,
    bold: Path | None = None,
    fallbacks: Sequence[Path] | None = None,
    dirs: Sequence[Path] = FONT_DIRS,
) -> PdfFonts:
    """The report fonts: explicit paths if given, else the Debian defaults under `dirs`.

    Raises:
        ConfigError: a font is missing (install `fonts-dejavu-core fonts-droid-fallback`).
    """
    hint = "install the Debian packages fonts-dejavu-core and fonts-droid-fallback"
    regular = _existing(regular, "regular") if regular else _search(REGULAR, dirs, hint)
    bold = _existing(bold, "bold") if bold else _search(BOLD, dirs, hint)
    if fallbacks is None:
        found = tuple([_search(CJK, dirs, hint)])
    else:
        found = tuple(_existing(p, "fallback") for p in fallbacks)
    return PdfFonts(regular=regular, bold=bold, fallbacks=found)


# sfnt versions of TrueType / OpenType fonts and collections (OpenType spec, "Font file").
_SFNT_MAGIC = (b"\x00\x01\x00\x00", b"OTTO", b"true", b"ttcf")


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"report {what} font {path} does not exist")
    # Checked here because fontTools leaks the file handle when it fails to parse a non-font.
    with path.open("rb") as fh:
        if fh.read(4) not in _SFNT_MAGIC:
            raise ConfigError(f"report {what} font {path} is not a TrueType/OpenType font")
    return path


def _search(names: Sequence[str], dirs: Sequence[Path], hint: str) -> Path:
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    raise ConfigError(
        f"report font {names[-1]} not found under {', '.join(map(str, dirs))}: {hint}"
    )
