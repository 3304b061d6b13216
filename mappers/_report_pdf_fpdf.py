"""The fpdf2 drawing of `mappers.report_pdf` (fpdf2 and fontTools are ~30 MB of RSS: this module
is imported by `render_report_pdf` on the first report, not by every process at start)."""

from __future__ import annotations

from fontTools.ttLib import TTLibError
from fpdf import FPDF
from fpdf.enums import WrapMode, XPos, YPos

from fhir_gateway.errors import MappingError
from mappers.report_pdf import _FAMILY, _PRODUCER, PdfFonts, PdfReport


class _Pdf(FPDF):
    def __init__(self, footer_text: str) -> None:
        super().__init__(format="A4")
        self._footer_text = footer_text

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(_FAMILY, size=8)
        self.cell(0, 5, f"{self._footer_text}  ·  page {self.page_no()}/{{nb}}", align="C")


def render(report: PdfReport, fonts: PdfFonts) -> bytes:
    pdf = _Pdf(footer_text=report.identifier)
    pdf.set_creation_date(report.issued)
    pdf.set_producer(_PRODUCER)
    pdf.set_title(report.title)
    pdf.set_author(report.organization)
    _load_fonts(pdf, fonts)
    pdf.alias_nb_pages()
    pdf.set_auto_page_break(auto=True, margin=16)
    pdf.add_page()

    pdf.set_font(_FAMILY, "B", 16)
    _para(pdf, report.title, height=8)
    if report.status_banner:
        pdf.set_text_color(160, 0, 0)
        pdf.set_font(_FAMILY, "B", 12)
        _para(pdf, report.status_banner, height=7)
        pdf.set_text_color(0, 0, 0)
    pdf.ln(2)

    _field(pdf, "Patient", report.patient)
    _field(pdf, "Patient identifier", report.patient_identifier)
    _field(pdf, "Referral", report.referral, wrap_chars=True)
    _field(pdf, "Report identifier", report.identifier, wrap_chars=True)
    _field(pdf, "Issued", report.issued.isoformat())

    if report.question:
        _heading(pdf, "Question from the referrer")
        pdf.set_font(_FAMILY, "", 11)
        _para(pdf, report.question)
    if report.specimens:
        _heading(pdf, "Specimens")
        pdf.set_font(_FAMILY, "", 10)
        for line in report.specimens:
            _para(pdf, f"• {line}")
    if report.findings:
        _heading(pdf, "Findings")
        for label, value in report.findings:
            _field(pdf, label, value)
    _heading(pdf, "Conclusion")
    pdf.set_font(_FAMILY, "", 11)
    _para(pdf, report.conclusion)
    for code in report.conclusion_codes:
        _para(pdf, f"• {code}")
    if report.recommendations:
        _heading(pdf, "Recommendations")
        pdf.set_font(_FAMILY, "", 11)
        for i, rec in enumerate(report.recommendations, 1):
            _para(pdf, f"{i}. {rec}")
    if report.addenda:
        _heading(pdf, "Addenda")
        pdf.set_font(_FAMILY, "", 11)
        for line in report.addenda:
            _para(pdf, line)
    for line in report.extra_lines:
        pdf.set_font(_FAMILY, "", 10)
        _para(pdf, line)
    _heading(pdf, "Reviewed by")
    pdf.set_font(_FAMILY, "", 11)
    _para(pdf, report.reviewer)
    _para(pdf, report.organization)
    out = pdf.output()
    return bytes(out)


def _load_fonts(pdf: FPDF, fonts: PdfFonts) -> None:
    try:
        pdf.add_font(_FAMILY, "", fonts.regular)
        pdf.add_font(_FAMILY, "B", fonts.bold or fonts.regular)
        names = []
        for i, path in enumerate(fonts.fallbacks):
            name = f"fallback{i}"
            pdf.add_font(name, "", path)
            pdf.add_font(name, "B", path)
            names.append(name)
    except (OSError, RuntimeError, ValueError, TTLibError) as exc:
        raise MappingError(f"report font unusable: {exc}", source="report", path="fonts") from exc
    if names:
        pdf.set_fallback_fonts(names, exact_match=False)


def _heading(pdf: FPDF, text: str) -> None:
    pdf.ln(3)
    pdf.set_font(_FAMILY, "B", 13)
    _para(pdf, text, height=7)


def _field(pdf: FPDF, label: str, value: str, *, wrap_chars: bool = False) -> None:
    pdf.set_font(_FAMILY, "B", 10)
    pdf.cell(45, 6, label, new_x=XPos.RIGHT, new_y=YPos.TOP)
    pdf.set_font(_FAMILY, "", 10)
    pdf.multi_cell(
        0,
        6,
        value or "-",
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
        wrapmode=WrapMode.CHAR if wrap_chars else WrapMode.WORD,
    )


def _para(pdf: FPDF, text: str, *, height: float = 6) -> None:
    pdf.multi_cell(0, height, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT, align="L")
