"""PDF document -> extracted text (pypdf), flagging pages that have no text layer (scans, faxes).

Pure: bytes in, text out; no OCR (a page without a text layer is reported, not guessed at).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import pypdf
from pypdf.errors import PdfReadError

from fhir_gateway.errors import ParseError, PayloadTooLargeError

SOURCE = "pdf"
MAX_PAGES = 2_000  # a referral PDF is tens of pages; more is a mistake or an attack
# A page "has text" when extraction gives at least this many non-space characters; a scanned
# page sometimes carries a stray character or two (page numbers stamped by the scanner).
MIN_CHARS_PER_PAGE = 3


@dataclass(frozen=True)
class PdfText:
    """The text of a PDF, page by page, and which pages had no extractable text."""

    pages: tuple[str, ...]
    pages_without_text: tuple[int, ...]  # 1-based page numbers

    @property
    def text(self) -> str:
        """All pages' text, pages separated by a form feed."""
        return "\f".join(self.pages)

    @property
    def page_count(self) -> int:
        return len(self.pages)

    @property
    def no_text_layer(self) -> bool:
        """True when no page has extractable text: a scanned (image-only) document."""
        return len(self.pages_without_text) == len(self.pages)

    @property
    def partly_scanned(self) -> bool:
        """Some pages have text and some have none (e.g. a typed cover page + scanned report)."""
        return 0 < len(self.pages_without_text) < len(self.pages)


def parse_pdf(data: bytes, *, max_pages: int = MAX_PAGES) -> pypdf.PdfReader:
    """Bytes -> a pypdf reader; encrypted PDFs are opened with the empty user password.

    Raises:
        ParseError: not a PDF, broken beyond reading, or encrypted with a real password.
        PayloadTooLargeError: more than `max_pages` pages.
    """
    if b"%PDF-" not in data[:1024]:
        raise ParseError("not a PDF (no %PDF- header)", source=SOURCE)
    try:
        reader = pypdf.PdfReader(BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ParseError("PDF is encrypted with a password", source=SOURCE)
        pages = len(reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ParseError(f"PDF cannot be read ({type(exc).__name__})", source=SOURCE) from exc
    if pages > max_pages:
        raise PayloadTooLargeError(f"PDF has {pages} pages; the limit is {max_pages}")
    return reader


def document_to_text(reader: pypdf.PdfReader) -> PdfText:
    """The text layer of every page (pypdf's layout-free extraction).

    A page whose content stream cannot be interpreted counts as a page without text rather than
    failing the whole document: the rest of the report is still worth having.
    """
    pages: list[str] = []
    empty: list[int] = []
    for number, page in enumerate(reader.pages, start=1):
        try:
            text = page.extract_text() or ""
        except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            text = ""
        text = text.replace("\x00", "").strip()
        if sum(1 for ch in text if not ch.isspace()) < MIN_CHARS_PER_PAGE:
            empty.append(number)
            text = ""
        pages.append(text)
    return PdfText(tuple(pages), tuple(empty))


def pdf_to_text(data: bytes, *, max_pages: int = MAX_PAGES) -> PdfText:
    """PDF bytes -> `PdfText` (`parse_pdf` then `document_to_text`).

    Raises:
        ParseError, PayloadTooLargeError: as `parse_pdf`.
    """
    return document_to_text(parse_pdf(data, max_pages=max_pages))
