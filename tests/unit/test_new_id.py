"""Row and resource ids: UUID version 7 (RFC 9562), time-ordered so inserts keep to the right
edge of the indexes keyed by them."""

from __future__ import annotations

import time
import uuid

from fhir_gateway.resources import new_id


def test_new_id_is_a_version_7_rfc_uuid_in_canonical_form() -> None:
    for _ in range(1000):
        text = new_id()
        value = uuid.UUID(text)
        assert str(value) == text  # lower-case, hyphenated: a valid FHIR id
        assert value.version == 7
        assert value.variant == uuid.RFC_4122


def test_new_id_carries_the_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid.UUID(new_id())
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_ids_made_later_sort_later_and_none_repeats() -> None:
    first = [new_id() for _ in range(5000)]
    time.sleep(0.002)
    second = [new_id() for _ in range(5000)]
    assert len(set(first + second)) == 10_000
    assert max(first) < min(second)  # as text too: what the indexes compare
    # The 74 random bits vary: not a counter in disguise.
    assert len({uuid.UUID(i).int & ((1 << 62) - 1) for i in first}) == 5000
