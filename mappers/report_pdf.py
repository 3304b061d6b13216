"""Second-opinion report -> PDF bytes (fpdf2), with Unicode fonts passed in by the caller.

Pure apart from fpdf2 reading the font files it is given: finding the fonts on disk is the
caller's job (`fhir_gateway.reports.fonts.find_report_fonts`). The same input gives byte-identical
output: the creation date is the report's issued time and the PDF /ID is a hash of the content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

_FAMILY = "report"
_PRODUCER = "fhir-gateway"


@dataclass(frozen=True)
class PdfFonts:
    """TrueType fonts: a regular and bold face with wide coverage (Latin, Greek, Cyrillic) and
    fallbacks tried glyph by glyph for what they lack (CJK)."""

    regular: Path
    bold: Path | None = None
    fallbacks: tuple[Path, ...] = ()


@dataclass(frozen=True)
class PdfReport:
    """What the PDF shows, already as display text (built by `mappers.report`)."""

    title: str
    status_banner: str | None
    patient: str
    patient_identifier: str
    referral: str
    findings: tuple[tuple[str, str], ...]
    conclusion: str
    conclusion_codes: tuple[str, ...]
    recommendations: tuple[str, ...]
    reviewer: str
    organization: str
    issued: datetime
    identifier: str
    extra_lines: tuple[str, ...] = field(default=())
    question: str = ""  # what the referrer asked (ServiceRequest reason and note)
    specimens: tuple[str, ...] = ()  # one line per specimen: type, accession, blocks, slides
    addenda: tuple[str, ...] = ()  # answers to the treating team's follow-up questions


def render_report_pdf(report: PdfReport, fonts: PdfFonts) -> bytes:
    """Render the report as an A4 PDF.

    Raises:
        MappingError: a font file is missing or unusable.
    """
    from mappers import _report_pdf_fpdf  # here: fpdf2 loads on the first report (~30 MB)

    return _report_pdf_fpdf.render(report, fonts)
