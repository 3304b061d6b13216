"""mappers/codes/fhir-elements.json against the fhir.resources R4B models it was taken from.

Normalising reads the table, so a normalisation never imports (and builds) the pydantic models
(~0.6 s of CPU and their memory in the first normalisation of a process). Regenerate after a
fhir.resources upgrade: `python tests/unit/test_fhir_elements_table.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mappers import fhir  # noqa: E402

TABLE = ROOT / "mappers" / "codes" / "fhir-elements.json"
ABOUT = (
    "Top-level element names of each FHIR resource type and those with max cardinality * "
    "(lists), from the fhir.resources R4B models; tests/unit/test_fhir_elements_table.py "
    "checks and regenerates it. Read from here so normalising never imports the models."
)


def table() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rtype in sorted(fhir.RESOURCE_TYPES):
        try:
            model = get_fhir_model_class(rtype)
        except (KeyError, ValueError, ImportError, AttributeError):
            continue  # an R4 type R4B dropped: no element check
        fields = model.model_fields
        out[rtype] = {
            "elements": sorted({n for name, f in fields.items() for n in (name, f.alias) if n}),
            "lists": sorted(
                f.alias or name
                for name, f in fields.items()
                if "List[" in str(f.annotation) or "list[" in str(f.annotation)
            ),
        }
    return out


def render(resources: dict[str, Any]) -> str:
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in resources.items()]
    about = json.dumps(ABOUT)
    return '{\n"_source": ' + about + ',\n"resources": {\n' + ",\n".join(lines) + "\n}}\n"


def test_table_matches_the_models() -> None:
    stored = json.loads(TABLE.read_text("utf-8"))["resources"]
    assert stored == table()


def test_the_mapper_reads_the_table() -> None:
    assert "valueQuantity" in fhir._elements("Observation")
    assert "category" in fhir._list_elements("Observation")
    assert "status" not in fhir._list_elements("Observation")
    assert fhir._elements("NoSuchType") == frozenset()


def test_normalising_imports_no_model() -> None:
    code = (
        "import sys; from mappers.fhir import InboundResource, resources_to_normalised; "
        "r = {'resourceType': 'Observation', 'id': 'o1', 'status': 'final', "
        "'category': {'coding': [{'code': 'laboratory'}]}, 'code': {'text': 'x'}}; "
        "out, issues = resources_to_normalised([InboundResource(r, 'Observation/o1')], 's'); "
        "assert out and any('read as a list' in i['diagnostics'] for i in issues), issues; "
        "print(sorted(m for m in sys.modules if m.startswith('fhir.resources.R4B.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


if __name__ == "__main__":
    TABLE.write_text(render(table()), "utf-8")
