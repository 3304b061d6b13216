"""WADO-RS retrieval benchmark against one real Orthanc + DICOMweb plugin, in one run.

Generates synthetic CT studies (uncompressed 512x512x16 bit, ~0.5 MB per instance), uploads them,
then retrieves each study with:
  (a) curl to /dev/null (the ceiling; `curl_file` also writes it to disk, the disk-bound
  anchor), (b) our streaming pull into the file image store,
  (c) dicomweb-client iter_study saving each instance, (d) dicomweb-client retrieve_study.
Each variant runs in its own subprocess; its peak RSS is VmHWM from /proc (see _rss_mb). CPU
seconds are shown for the client (the transfer only, all threads) and for Orthanc: on a 2-core
machine their sum bounds the wall time from below.
Ratios are against curl measured in the same run (DESIGN.md performance targets).

    python tests/benchmarks/bench_wado.py --sizes 500,2000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


# --- synthetic data -------------------------------------------------------------------------


def synthetic_ct(study_uid: str, series_uid: str, number: int, rows: int, cols: int) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName = "BENCH-1", "Bench^Synthetic"
    ds.Modality, ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "CT", "20260101", 1, number
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = os.urandom(rows * cols * 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def upload_study(url: str, instances: int, series: int, rows: int, cols: int) -> tuple[str, int]:
    import requests
    from pydicom.uid import generate_uid

    study_uid = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    session = requests.Session()

    def one(i: int) -> int:
        data = synthetic_ct(study_uid, series_uids[i % series], i + 1, rows, cols)
        session.post(f"{url}/instances", data=data, timeout=120).raise_for_status()
        return len(data)

    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(one, range(instances)))
    return study_uid, total


# --- variants (run in child processes) --------------------------------------------------------


def child(variant: str, dicomweb: str, study_uid: str, out: Path) -> dict[str, float]:
    """Run one variant; returns wall time of the transfer, bytes kept and RSS before it."""
    if variant == "ours":
        import requests

        from connectors.dicomweb import DicomwebClient
        from fhir_gateway.imaging.retrieval import StudySelector, pull_case_images
        from fhir_gateway.imaging.store import FileImageStore
        from fhir_gateway.store import open_store

        # The data dir was set up (migrated, case row) by the parent, as a deployed gateway's is.
        store = open_store(f"sqlite:///{out / 'gw.db'}", migrate=False)
        image_store = FileImageStore(store, out)
        parallel = int(os.environ.get("BENCH_WADO_PARALLEL", "4"))  # settings' default: 4
        client = DicomwebClient(requests.Session(), dicomweb, max_parallel=parallel)
        base, cpu0 = _rss_mb(), _cpu_s(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        counts = pull_case_images(
            store, "bench", client, image_store, [StudySelector(study_uid=study_uid)]
        )
        wall = time.perf_counter() - t0
        cpu = _cpu_s(resource.RUSAGE_SELF) - cpu0
        return {
            "wall_s": wall,
            "bytes": counts.bytes,
            "base_rss_mb": base,
            "peak_mb": _rss_mb(),
            "cpu_s": cpu,
        }
    if variant in ("iter_study", "retrieve_study"):
        from dicomweb_client.api import DICOMwebClient

        client_ = DICOMwebClient(dicomweb)
        base, cpu0 = _rss_mb(), _cpu_s(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        n = 0
        datasets = (
            client_.iter_study(study_uid)
            if variant == "iter_study"
            else client_.retrieve_study(study_uid)
        )
        for i, ds in enumerate(datasets):
            path = out / f"{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            n += path.stat().st_size
        wall = time.perf_counter() - t0
        cpu = _cpu_s(resource.RUSAGE_SELF) - cpu0
        return {"wall_s": wall, "bytes": n, "base_rss_mb": base, "peak_mb": _rss_mb(), "cpu_s": cpu}
    raise SystemExit(f"unknown variant {variant}")


def _cpu_s(who: int) -> float:
    """User + system CPU seconds (all threads) of this process or of its waited-for children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _server_cpu_s(pid: int) -> float:
    """User + system CPU seconds the server process (Orthanc) has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb() -> float:
    """Peak RSS of this process image (VmHWM, per address space).

    Not ru_maxrss: after fork/vfork + exec it still carries the parent's high-water mark, so a
    child of a big parent would look big (we saw curl "use" the parent's 57 MB).
    """
    return _hwm_mb("self") or 0.0


def _hwm_mb(pid: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def prepare_gateway_dir(out: Path) -> None:
    """A migrated gateway database with one case, as `fhir-gateway serve` would leave it."""
    from fhir_gateway.store import open_store
    from tests.integration.imaging.cases import make_case

    store = open_store(f"sqlite:///{out / 'gw.db'}")
    make_case(store, "bench")
    store.dispose()


def run_variant(
    variant: str, dicomweb: str, study_uid: str, work: Path, server_pid: int
) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-", dir=work))
    try:
        if variant in ("curl", "curl_file"):
            target = "/dev/null" if variant == "curl" else str(out / "study.multipart")
            cmd = [
                "curl", "-s", "-o", target, "-w", "%{size_download}",
                "-H", f"Accept: {ACCEPT}", f"{dicomweb}/studies/{study_uid}",
            ]  # fmt: skip
        else:
            if variant == "ours":
                prepare_gateway_dir(out)
            cmd = [sys.executable, __file__, "--child", variant, dicomweb, study_uid, str(out)]
        t0, server0 = time.perf_counter(), _server_cpu_s(server_pid)
        children0 = _cpu_s(resource.RUSAGE_CHILDREN)
        with tempfile.TemporaryFile() as sink:
            proc = subprocess.Popen(cmd, stdout=sink, cwd=ROOT)
            peak = 0.0
            while proc.poll() is None:  # VmHWM of the child's own address space
                peak = max(peak, _hwm_mb(str(proc.pid)) or 0.0)
                time.sleep(0.01)
            wall = time.perf_counter() - t0
            server_cpu = _server_cpu_s(server_pid) - server0
            sink.seek(0)
            stdout = sink.read()
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed with {proc.returncode}")
        if variant in ("curl", "curl_file"):
            return {
                "wall_s": wall,
                "bytes": float(stdout),
                "base_rss_mb": 0.0,
                "peak_mb": peak,
                "cpu_s": _cpu_s(resource.RUSAGE_CHILDREN) - children0,
                "server_cpu_s": server_cpu,
            }
        result: dict[str, float] = json.loads(stdout.decode().strip().splitlines()[-1])
        return {**result, "peak_mb": max(peak, result["peak_mb"]), "server_cpu_s": server_cpu}
    finally:
        shutil.rmtree(out, ignore_errors=True)


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,2000", help="instances per study, comma list")
    parser.add_argument("--series", type=int, default=4, help="series per study")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--variants", default="curl,curl_file,ours,iter_study,retrieve_study")
    parser.add_argument(
        "--large-variants", default="curl,curl_file,ours", help="variants for sizes after the first"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / ".bench",
        help="where Orthanc's storage and every variant's output go (one filesystem for all; "
        "on our VM /tmp creates files 60x slower than /work)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each variant, in rotating order; the table shows the median wall time "
        "and the highest peak RSS (this VM's timings vary by +-30%% from run to run)",
    )
    parser.add_argument(
        "--parallel", type=int, default=4, help="series fetched at once by ours (default 4)"
    )
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "URL", "STUDY", "OUT"))
    args = parser.parse_args()
    if args.child:
        variant, url, study, out = args.child
        result = child(variant, url, study, Path(out))
        print(json.dumps(result))
        return

    from tests.servers.orthanc import run_orthanc

    os.environ["BENCH_WADO_PARALLEL"] = str(args.parallel)

    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[tuple[str, str, dict[str, float]]] = []
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    with run_orthanc(Path(tempfile.mkdtemp(prefix="bench-orthanc-", dir=work)), aet="BENCH") as o:
        for k, n in enumerate(sizes):
            t0 = time.perf_counter()
            study, total = upload_study(o.url, n, args.series, args.rows, args.cols)
            took = time.perf_counter() - t0
            print(f"# uploaded {n} instances, {total / 1e6:.0f} MB in {took:.1f}s", file=sys.stderr)
            variants = (args.variants if k == 0 else args.large_variants).split(",")
            assert o.process is not None
            pid = o.process.pid
            run_variant("curl", o.dicomweb_url, study, work, pid)  # warm Orthanc's caches
            runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for rep in range(args.repeat):
                shift = rep % len(variants)  # no variant always runs right after another
                for v in variants[shift:] + variants[:shift]:
                    r = run_variant(v, o.dicomweb_url, study, work, pid)
                    runs[v].append(r)
                    print(f"# {v}: {r}", file=sys.stderr)
            for v in variants:
                rows.append((f"{total / 1e6:.0f} MB / {n}", v, summarise(runs[v])))
    print_table(rows)
    from tests.benchmarks.ratios import report

    curl = {size: r for size, v, r in rows if v == "curl"}
    for size, v, r in rows:
        if v == "ours" and size in curl:
            # Throughput target >= 80% of curl's: time ratio <= 1.25.
            report(f"WADO-RS pull into the store ({size})", r["wall_s"], curl[size]["wall_s"],
                   "<= 1.25", "curl same study")  # fmt: skip


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median wall time (with its bytes); highest peak and base RSS over the runs."""
    mid = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return {
        **mid,
        "peak_mb": max(r["peak_mb"] for r in runs),
        "base_rss_mb": max(r["base_rss_mb"] for r in runs),
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "server_cpu_s": statistics.median(r["server_cpu_s"] for r in runs),
    }


def print_table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    curl = {size: r for size, v, r in rows if v == "curl"}
    iter_ = {size: r for size, v, r in rows if v == "iter_study"}
    print(
        f"{'study':>16} {'variant':>15} {'wall s':>8} {'MB/s':>8} {'x curl':>7} "
        f"{'x iter':>7} {'peak RSS MB':>12} {'base RSS MB':>12} {'transfer MB':>12} "
        f"{'CPU s':>6} {'Orthanc CPU s':>14}"
    )
    for size, v, r in rows:
        mbps = r["bytes"] / 1e6 / r["wall_s"]
        c = curl[size]["bytes"] / 1e6 / curl[size]["wall_s"] if size in curl else float("nan")
        it = iter_[size]["bytes"] / 1e6 / iter_[size]["wall_s"] if size in iter_ else float("nan")
        print(
            f"{size:>16} {v:>15} {r['wall_s']:8.2f} {mbps:8.1f} {mbps / c:7.2f} "
            f"{mbps / it:7.2f} {r['peak_mb']:12.1f} {r['base_rss_mb']:12.1f} "
            f"{r['peak_mb'] - r['base_rss_mb'] if r['base_rss_mb'] else float('nan'):12.1f} "
            f"{r['cpu_s']:6.2f} {r['server_cpu_s']:14.2f}"
        )


if __name__ == "__main__":
    main()
