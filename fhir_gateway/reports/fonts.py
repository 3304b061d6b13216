"""Find the TrueType fonts the report PDF needs (file system look-up, kept out of the mappers).

The fonts ship with the package (`fhir_gateway/reports/fonts/`, licences beside them): DejaVu
Sans regular and bold (Latin, Greek, Cyrillic; Bitstream Vera / Arev licence, DejaVu changes in
the public domain) and Droid Sans Fallback (CJK; Apache-2.0). So a plain `pip install` renders
every name without system font packages, and the same report gives the same PDF on every host.
The Debian font directories are searched after the packaged ones (for a distribution that strips
vendored fonts). Explicit paths replace them (settings `reports.font_regular`,
`reports.font_bold`, `reports.font_fallbacks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fhir_gateway.errors import ConfigError
from mappers.report_pdf import PdfFonts

PACKAGED_FONTS = Path(__file__).parent / "fonts"
FONT_DIRS: tuple[Path, ...] = (
    PACKAGED_FONTS,
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
    dirs: Sequence[Path] | None = None,
) -> PdfFonts:
    """The report fonts: explicit paths if given, else the packaged fonts (or under `dirs`).

    Raises:
        ConfigError: a font is missing or not a font file.
    """
    dirs = FONT_DIRS if dirs is None else dirs
    hint = "reinstall fhir-gateway (its fonts ship in fhir_gateway/reports/fonts) or set "
    hint += "FHIR_GATEWAY_REPORTS__FONT_REGULAR / __FONT_BOLD / __FONT_FALLBACKS"
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
