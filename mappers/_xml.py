"""Safe XML parsing and namespaced XPath helpers shared by the XML mappers."""

from __future__ import annotations

import re

from lxml import etree

from fhir_gateway.errors import ParseError

NS = {
    "cda": "urn:hl7-org:v3",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
    "sdtc": "urn:hl7-org:sdtc",
}
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
Element = etree._Element

# No entity resolution, no DTD loading, no network: XXE and billion-laughs inputs cannot expand.
_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False, huge_tree=False
)
_DOCTYPE_RE = re.compile(rb"<!DOCTYPE", re.IGNORECASE)


def parse_xml(data: bytes, source: str) -> Element:
    """Bytes -> root element; a DOCTYPE (the carrier of entity attacks) is refused outright."""
    if _DOCTYPE_RE.search(data[:4096]) or _DOCTYPE_RE.search(data):
        raise ParseError(
            "XML with a DOCTYPE/DTD is not accepted (entities are never expanded)", source=source
        )
    try:
        root = etree.fromstring(data, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise ParseError(f"not well-formed XML: {exc.msg}", source=source) from exc
    if root is None:
        raise ParseError("empty XML document", source=source)
    return root


def first(element: Element, path: str) -> Element | None:
    found = element.find(path, NS)
    return found


def attr(element: Element | None, path: str, name: str) -> str:
    """Attribute `name` of the first element at `path` under `element` ('' when absent)."""
    if element is None:
        return ""
    target = element if path == "." else element.find(path, NS)
    if target is None:
        return ""
    return (target.get(name) or "").strip()


def text(element: Element | None) -> str:
    if element is None:
        return ""
    return " ".join("".join(str(t) for t in element.itertext()).split())


def xpath_of(element: Element) -> str:
    """A readable XPath of `element` (`/ClinicalDocument/component/.../entry[2]`)."""
    parts: list[str] = []
    node: Element | None = element
    while node is not None:
        name = etree.QName(node).localname
        parent = node.getparent()
        if parent is None:
            parts.append(name)
            break
        same = [c for c in parent if isinstance(c.tag, str) and c.tag == node.tag]
        parts.append(f"{name}[{same.index(node) + 1}]" if len(same) > 1 else name)
        node = parent
    return "/" + "/".join(reversed(parts))


def template_ids(element: Element) -> list[str]:
    return [t.get("root") or "" for t in element.findall("cda:templateId", NS)]
