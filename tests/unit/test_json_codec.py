"""fhir_gateway.resources' JSON helpers (orjson, with `json` for what orjson refuses): the same
text and values as the standard library's compact, non-ASCII form."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from fhir_gateway.resources import json_bytes, json_compact, json_loads


def _stdlib(value: Any, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)


RESOURCE = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"family": "Müller-Ødegård", "given": ["Zoë", "李"]}],
    "active": True,
    "multipleBirthInteger": 2,
    "extension": [{"url": "urn:x", "valueDecimal": 1.5}, {"url": "urn:y", "valueString": None}],
}


@pytest.mark.parametrize(
    "value",
    [
        RESOURCE,
        {2: "non-string key"},  # orjson refuses: the json path
        {"big": 2**70},  # beyond 64 bits: the json path
        [],
        "é",
    ],
    ids=["resource", "int-key", "big-int", "empty", "string"],
)
@pytest.mark.parametrize("sort_keys", [False, True])
def test_text_and_bytes_equal_the_standard_librarys(value: Any, sort_keys: bool) -> None:
    expected = _stdlib(value, sort_keys)
    assert json_compact(value, sort_keys=sort_keys) == expected
    assert json_bytes(value, sort_keys=sort_keys) == expected.encode("utf-8")


def test_loads_reads_what_orjson_refuses_as_json_does() -> None:
    assert json_loads('{"a":[1,"ü"]}') == {"a": [1, "ü"]}
    assert json_loads(b'{"a":1}') == {"a": 1}
    assert math.isnan(json_loads('{"v":NaN}')["v"])  # orjson refuses NaN
    with pytest.raises(json.JSONDecodeError):
        json_loads("{not json")
