"""Benchmark: normalise a ~10,000-resource Synthea case; stream its bundle JSON.

Run: `python tests/benchmarks/bench_normalise.py` (prints numbers; no asserts).

1. resources/s of parse + normalise + serialise (mappers.fhir) vs an anchor measured in the same
   run: parse + validate + re-serialise the same resources with fhir.resources R4B models
   (target: ratio >= 1x).
2. bundle JSON: `iter_bundle_json` over already-serialised resources vs building and serialising
   the same Bundle through fhir.resources (target: >= 5x faster and under 0.5 s).
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fhir.resources.R4B import get_fhir_model_class  # noqa: E402
from fhir.resources.R4B.bundle import Bundle  # noqa: E402

from fhir_gateway.casebundle.assemble import SourceBatch, assemble_case_bundle, iter_bundle_json  # noqa: E402
from mappers import fhir  # noqa: E402
from tests.benchmarks.ratios import report  # noqa: E402

SYNTHEA = [
    ROOT / "fixtures/fhir/colon_Darin_Skiles.json",
    ROOT / "fixtures/fhir/prostate_Andy_Schaden.json",
]
TARGET = 10_000
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def documents() -> list[bytes]:
    """Copies of the Synthea bundles with every uuid changed, until ~TARGET resources."""
    texts = [p.read_text("utf-8") for p in SYNTHEA]
    per_round = sum(len(json.loads(t)["entry"]) for t in texts)
    out: list[bytes] = []
    for copy in range(-(-TARGET // per_round)):
        namespace = uuid.UUID(int=copy + 1)

        def renamed(match: re.Match[str], ns: uuid.UUID = namespace) -> str:
            return str(uuid.uuid5(ns, match.group(0)))

        for text in texts:
            changed = UUID_RE.sub(renamed, text)
            out.append(changed.encode("utf-8"))
    return out


def ours(docs: list[bytes]) -> tuple[float, list[list[dict[str, object]]]]:
    start = time.perf_counter()
    mapped = []
    for number, data in enumerate(docs):
        resources, _ = fhir.resources_to_normalised(fhir.parse_fhir(data), f"ehr-{number}")
        for resource in resources:
            json.dumps(resource, separators=(",", ":"))
        mapped.append(resources)
    return time.perf_counter() - start, mapped


def anchor(docs: list[bytes]) -> float:
    start = time.perf_counter()
    for data in docs:
        for entry in json.loads(data)["entry"]:
            resource = entry["resource"]
            model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            model.model_dump_json()
    return time.perf_counter() - start


def main() -> None:
    docs = documents()
    count = sum(len(json.loads(d)["entry"]) for d in docs)
    fhir.resources_to_normalised(fhir.parse_fhir(docs[0]), "warm-up")  # load tables/models once
    anchor(docs[:1])

    t_ours, mapped = ours(docs)
    t_anchor = anchor(docs)
    print(f"resources: {count}")
    print(f"normalise (parse+map+serialise): {t_ours:.3f} s = {count / t_ours:,.0f} resources/s")
    print(
        f"anchor fhir.resources R4B (parse+validate+serialise): {t_anchor:.3f} s = "
        f"{count / t_anchor:,.0f} resources/s"
    )
    print(f"ratio normalise vs anchor: {t_anchor / t_ours:.2f}x (target >= 1x)")
    report(f"normalise {count} resources", t_ours, t_anchor, "<= 1.0", "fhir.resources R4B")

    # One source batch: the copies differ only in ids, so across sources they would (rightly)
    # be merged as duplicates; within one source distinct ids stay distinct resources.
    everything = [r for resources in mapped for r in resources]
    batches = [SourceBatch("ehr", everything, [], "fhir", "synthea-copies", "2026-01-01T00:00:00Z")]
    start = time.perf_counter()
    case = assemble_case_bundle(str(mapped[0][0]["id"]), batches)
    t_assemble = time.perf_counter() - start
    stored = [(r["resourceType"], r["id"], json.dumps(r, separators=(",", ":")))
              for r in case.resources]  # fmt: skip  # what the store holds

    start = time.perf_counter()
    size = sum(len(chunk) for chunk in iter_bundle_json(case.patient_id, stored))
    t_stream = time.perf_counter() - start

    bundle_dict = case.as_dict()
    start = time.perf_counter()
    model = Bundle.model_validate(bundle_dict)
    t_build = time.perf_counter() - start
    start = time.perf_counter()
    model.model_dump_json()
    t_dump = time.perf_counter() - start

    print(f"assemble case bundle ({len(case.resources)} entries): {t_assemble:.3f} s")
    print(
        f"bundle JSON streamed from stored JSON: {t_stream:.4f} s ({size / 1e6:.1f} MB) "
        "(target < 0.5 s)"
    )
    print(
        f"bundle JSON via fhir.resources (build model + dump): {t_build + t_dump:.3f} s "
        f"-> streaming is {(t_build + t_dump) / t_stream:.1f}x faster (target >= 5x)"
    )
    print(
        f"bundle JSON via fhir.resources (dump of a ready model only): {t_dump:.3f} s "
        f"-> streaming is {t_dump / t_stream:.1f}x faster"
    )


if __name__ == "__main__":
    main()
