"""The service's start-up preload: the FHIR model classes intake validates imported, with job
workers the unit factor table loaded (not ucumvert's registry: ~11 MB), and the start-up heap
frozen out of the cyclic GC (what a big case's normalisation would otherwise scan at every full
collection)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap

from fhir_gateway import app
from mappers import units


def test_preload_loads_the_factor_table_and_freezes_the_heap() -> None:
    gc.unfreeze()
    try:
        app._preload(True)
        assert units._factors.cache_info().currsize == 1
        assert gc.get_freeze_count() > 10_000  # the imports alone are far more objects
    finally:
        gc.unfreeze()


def test_preload_imports_the_model_classes_intake_validates() -> None:
    """In a fresh interpreter (this one imported them long ago): none of the hosted types'
    model modules is imported with the app; all are after the preload of a process without
    job workers (which loads no unit table), and neither builds ucumvert's registry."""
    script = textwrap.dedent(
        """
        import json, sys
        from fhir_gateway import app
        from fhir_gateway.intake.hosted import HOSTED_TYPES
        from mappers import units
        names = {t: "fhir.resources.R4B." + t.lower() for t in HOSTED_TYPES}
        before = sorted(t for t, m in names.items() if m in sys.modules)
        app._preload(False)
        after = sorted(t for t, m in names.items() if m in sys.modules)
        app._preload(True)
        registry = units._registry.cache_info().currsize
        print(json.dumps([before, after, registry, units._factors.cache_info().currsize]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    before, after, registry, table = json.loads(out.strip().splitlines()[-1])
    from fhir_gateway.intake.hosted import HOSTED_TYPES

    assert before == []
    assert after == sorted(HOSTED_TYPES)
    assert registry == 0
    assert table == 1
