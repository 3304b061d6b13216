"""Golden files: fixtures/<kind>/<name>.* -> fixtures/expected/<kind>/<name>.json.

Regenerate with `pytest tests/unit/mappers/test_golden.py --update-golden` and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.mappers._helpers import FIXTURES, fixture_files, fixture_id, map_one


def _expected_path(path: Path) -> Path:
    return FIXTURES / "expected" / path.parent.name / (path.stem + ".json")


@pytest.mark.parametrize("path", fixture_files(), ids=fixture_id)
def test_mapper_output_matches_golden(path: Path, update_golden: bool) -> None:
    resources, issues, kind = map_one(path)
    actual = {"kind": kind, "resources": resources, "issues": issues}
    text = json.dumps(actual, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    expected = _expected_path(path)
    if update_golden:
        expected.parent.mkdir(parents=True, exist_ok=True)
        expected.write_text(text, encoding="utf-8")
    if not expected.exists():
        pytest.fail(f"no golden file {expected.relative_to(FIXTURES)}; run with --update-golden")
    assert json.loads(text) == json.loads(expected.read_text(encoding="utf-8"))
