"""Every benchmark in tests/benchmarks/, short versions, one table of ratios against anchors
measured in the same run, with the machine's core count and load average beside it.

    python tests/benchmarks/run_all.py            # quick versions (a few minutes)
    python tests/benchmarks/run_all.py --full     # the full sizes (much longer)
    python tests/benchmarks/run_all.py --only bench_dicomweb,bench_bundle_api

Each benchmark runs in its own process and prints `RATIO {...}` lines (tests/benchmarks/
ratios.py); ratio = ours / anchor in seconds, so lower is better, and the target is on that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# name -> arguments for the quick version (BENCH_QUICK=1 shrinks the others' data too)
QUICK_ARGS: dict[str, list[str]] = {
    "bench_wado": ["--sizes", "100", "--repeat", "1", "--variants", "curl,ours"],
    "bench_dicomweb": ["--quick"],
    "bench_case_complete": ["--quick"],
    "bench_intake": ["--quick"],  # 0 and 100,000 stored, 300 transactions per run
}


def run_one(name: str, full: bool) -> tuple[list[dict[str, object]], float, str]:
    env = dict(os.environ, FHIR_GATEWAY_LOG_LEVEL="WARNING")
    args = [] if full else QUICK_ARGS.get(name, [])
    if not full:
        env["BENCH_QUICK"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / f"{name}.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - t0
    ratios = [
        json.loads(line.removeprefix("RATIO "))
        for line in proc.stdout.splitlines()
        if line.startswith("RATIO ")
    ]
    extra = " ".join(line for line in proc.stdout.splitlines() if line.startswith("RSS "))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        extra += f"FAILED (exit {proc.returncode}): {' | '.join(tail)}"
    return ratios, took, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full sizes (slow)")
    parser.add_argument("--only", default="", help="comma list of benchmark names")
    args = parser.parse_args()
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    cores, load = os.cpu_count(), os.getloadavg()
    print(f"# {cores} cores; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows: list[tuple[str, dict[str, object]]] = []
    notes: list[str] = []
    started = time.perf_counter()
    for name in names:
        print(f"# running {name} ...", file=sys.stderr, flush=True)
        ratios, took, extra = run_one(name, args.full)
        rows += [(name, r) for r in ratios]
        notes.append(f"# {name}: {took:.0f} s {extra}".rstrip())
    load = os.getloadavg()
    header = (
        f"| {'benchmark':<20} | {'metric':<52} | {'ours s':>8} | {'anchor':<22} | "
        f"{'anchor s':>8} | {'ratio':>6} | {'target':<16} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        anchor_s = "" if r["anchor_s"] is None else f"{r['anchor_s']:.3f}"
        print(
            f"| {name:<20} | {str(r['metric'])[:52]:<52} | {r['ours_s']:8.3f} | "
            f"{str(r['anchor'])[:22]:<22} | {anchor_s:>8} | {ratio:>6} | {r['target']!s:<16} |"
        )
    for note in notes:
        print(note)
    print(
        f"# {cores} cores; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"all benchmarks took {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
