"""mappers.pdf: text extraction with pypdf, and the "no text layer (scanned)" flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_gateway.errors import ParseError, PayloadTooLargeError
from mappers.pdf import pdf_to_text

PDFS = Path(__file__).resolve().parents[3] / "fixtures" / "pdf"


def test_pdf_with_text_layer():
    result = pdf_to_text((PDFS / "text-report.pdf").read_bytes())
    assert result.page_count == 2
    assert "invasive ductal carcinoma" in result.pages[0]
    assert "margins clear" in result.pages[1]
    assert result.text == "\f".join(result.pages)
    assert (result.no_text_layer, result.partly_scanned, result.pages_without_text) == (
        False,
        False,
        (),
    )


def test_scanned_pdf_has_no_text_layer():
    result = pdf_to_text((PDFS / "scanned-report.pdf").read_bytes())
    assert result.page_count == 1
    assert result.no_text_layer
    assert result.text == ""
    assert result.pages_without_text == (1,)


def test_partly_scanned_pdf_names_the_pages_without_text():
    result = pdf_to_text((PDFS / "mixed-report.pdf").read_bytes())
    assert (result.page_count, result.pages_without_text) == (2, (2,))
    assert result.partly_scanned
    assert not result.no_text_layer
    assert "SURGICAL PATHOLOGY REPORT" in result.text


@pytest.mark.parametrize(
    "data",
    [b"", b"MSH|^~\\&|", b"%PDF-1.7\n" + b"\x00" * 64, b"%PDF-1.4\n1 0 obj << /Type /Catalog"],
)
def test_unreadable_pdfs_raise_parse_error(data):
    with pytest.raises(ParseError):
        pdf_to_text(data)


def test_truncated_pdf_is_parse_error_or_partial_text():
    data = (PDFS / "text-report.pdf").read_bytes()
    try:
        result = pdf_to_text(data[: len(data) // 2])
    except ParseError:
        return
    assert result.page_count <= 2  # pypdf recovered what it could; no crash either way


def test_page_limit():
    with pytest.raises(PayloadTooLargeError):
        pdf_to_text((PDFS / "text-report.pdf").read_bytes(), max_pages=1)
