"""Fixtures and options for the mapper tests.

`pytest tests/unit/mappers --update-golden` rewrites fixtures/expected/<kind>/<name>.json from
the current mapper output (then review the diff by eye before committing).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite fixtures/expected/* golden files from the current mapper output",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))
