"""The service's start-up preload: the UCUM registry built, the start-up heap frozen out of the
cyclic GC (what a big case's normalisation would otherwise scan at every full collection)."""

from __future__ import annotations

import gc

from fhir_gateway import app
from mappers import units


def test_preload_builds_the_registry_and_freezes_the_heap() -> None:
    gc.unfreeze()
    try:
        app._preload()
        assert units._registry.cache_info().currsize == 1
        assert gc.get_freeze_count() > 10_000  # the imports alone are far more objects
    finally:
        gc.unfreeze()
