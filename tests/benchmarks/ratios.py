"""One machine-readable line per measured ratio, collected by tests/benchmarks/run_all.py."""

from __future__ import annotations

import json
import os


def quick() -> bool:
    """Whether run_all asked for the short version (`BENCH_QUICK=1`)."""
    return os.environ.get("BENCH_QUICK") == "1"


def report(metric: str, ours: float, anchor: float | None, target: str, anchor_name: str) -> None:
    """`RATIO {...}`: ours / anchor (seconds), or ours alone when there is no anchor."""
    line = {
        "metric": metric,
        "ours_s": round(ours, 4),
        "anchor": anchor_name,
        "anchor_s": round(anchor, 4) if anchor else None,
        "ratio": round(ours / anchor, 3) if anchor else None,
        "target": target,
    }
    print("RATIO " + json.dumps(line), flush=True)
