"""tus upload benchmark: a large file uploaded into a case over tus, against anchors, in one run.

Starts `fhir-gateway serve` (uvicorn, SQLite) in a subprocess, makes a case, then:
  (a) anchor: a raw copy of the file on the same disk (`shutil.copyfile`, the disk-bound floor);
  (b) anchor: `curl` sending the file as one PATCH body to a tus upload (the transfer alone,
      no chunking; its server side is ours, so it also measures our PATCH streaming);
  (c) the tus upload in 64 MiB PATCH chunks with `Upload-Checksum: sha256` per chunk (curl);
  (d) an interrupted upload: curl killed part-way, HEAD gives the offset, the rest is sent.
The server's peak RSS (VmHWM from /proc) is read before and after: it must stay flat (the body
is streamed to the part file, never held). The completed file is then processed as an upload
(here: zeros, so it is rejected as a document over the document limit; the upload is the
measured part). Ratios are against the anchors measured in the same run.

    python tests/benchmarks/bench_tus.py --mb 1024
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHUNK = 64 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> tuple[float, float]:
    """(current VmRSS, peak VmHWM) of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024, help="file size in MiB")
    args = parser.parse_args()
    size = args.mb * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="bench-tus-"))
    data_dir = work / "data"
    data_dir.mkdir()
    src = work / "payload.bin"
    with src.open("wb") as out:
        block = b"\0" * CHUNK
        left = size
        while left:
            n = min(left, CHUNK)
            out.write(block[:n])
            left -= n
    port = free_port()
    env = {
        **os.environ,
        "FHIR_GATEWAY_LIMITS__MAX_TUS_BYTES": str(size * 2),
        "FHIR_GATEWAY_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
    }
    exe = Path(sys.executable).parent / "fhir-gateway"
    server = subprocess.Popen(
        [str(exe), "serve", "--port", str(port), "--data-dir", str(data_dir), "--workers", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/ready").stdout == "200":
                break
            time.sleep(0.1)
        from fhir_gateway.security.auth import mint_dev_token
        from fhir_gateway.settings import Settings
        from fhir_gateway.store import open_store
        from tests.conftest import add_case

        store = open_store(Settings(data_dir=data_dir).db_url)
        add_case(store, "bench-case", "Patient/bench", partner_id="p1")
        token = mint_dev_token(data_dir, role="ehr", sub="bench", partner="p1")
        auth = [
            *("-H", f"Authorization: Bearer {token}", "-H", "Tus-Resumable: 1.0.0"),
            *("-H", "Expect:"),  # no 100-continue round trip
        ]
        uploads = f"{base}/cases/bench-case/uploads/"
        before = rss_mb(server.pid)

        def create() -> str:
            got = curl(*auth, "-X", "POST", "-H", f"Upload-Length: {size}", "-D", "-", uploads)
            for line in got.stdout.splitlines():
                if line.lower().startswith("location:"):
                    return line.split(":", 1)[1].strip()
            raise RuntimeError(f"no Location: {got.stdout} {got.stderr}")

        def patch(url: str, offset: int, path: Path, checksum: str | None = None) -> str:
            headers = [
                *auth,
                "-H",
                "Content-Type: application/offset+octet-stream",
                "-H",
                f"Upload-Offset: {offset}",
            ]
            if checksum:
                headers += ["-H", f"Upload-Checksum: sha256 {checksum}"]
            got = curl(
                *headers,
                "-X",
                "PATCH",
                "-T",
                str(path),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            )
            return got.stdout

        # (a) raw copy
        t = time.perf_counter()
        shutil.copyfile(src, work / "copy.bin")
        os.sync()
        copy_s = time.perf_counter() - t
        (work / "copy.bin").unlink()

        # (b) curl, one PATCH of the whole file
        t = time.perf_counter()
        status = patch(create(), 0, src)
        one_s = time.perf_counter() - t
        assert status == "204", status

        # (c) tus in chunks with a sha256 checksum per chunk
        url = create()
        piece = work / "piece.bin"
        t = time.perf_counter()
        offset = 0
        with src.open("rb") as fh:
            while offset < size:
                data = fh.read(CHUNK)
                piece.write_bytes(data)
                digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
                status = patch(url, offset, piece, digest)
                assert status == "204", status
                offset += len(data)
        chunked_s = time.perf_counter() - t

        # (d) interrupted upload, resumed from HEAD
        url = create()
        proc = subprocess.Popen(
            [
                "curl",
                "-sS",
                *auth,
                "-H",
                "Content-Type: application/offset+octet-stream",
                "-H",
                "Upload-Offset: 0",
                "-X",
                "PATCH",
                "-T",
                str(src),
                "--limit-rate",
                f"{max(size // 4, 1 << 20)}",
                "-o",
                "/dev/null",
                url,
            ]
        )
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)
        head = curl(*auth, "-I", url).stdout
        resumed_at = next(
            int(line.split(":", 1)[1])
            for line in head.splitlines()
            if line.lower().startswith("upload-offset:")
        )
        rest = work / "rest.bin"
        with src.open("rb") as fh, rest.open("wb") as out:
            fh.seek(resumed_at)
            shutil.copyfileobj(fh, out, CHUNK)
        status = patch(url, resumed_at, rest)
        assert status == "204", status
        after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1024 / 1024
    print(f"file: {mb:.0f} MiB")
    print(
        f"(a) raw copy on the same disk       {copy_s:6.2f} s  {mb / copy_s:7.1f} MiB/s  (anchor)"
    )
    print(
        f"(b) tus, one PATCH (curl)           {one_s:6.2f} s  {mb / one_s:7.1f} MiB/s  "
        f"ratio to copy {copy_s / one_s:.2f}"
    )
    print(
        f"(c) tus, 64 MiB PATCHes + sha256    {chunked_s:6.2f} s  {mb / chunked_s:7.1f} MiB/s  "
        f"ratio to (b) {one_s / chunked_s:.2f}"
    )
    print(f"(d) interrupted at {resumed_at / 1024 / 1024:.0f} MiB, resumed from HEAD: completed")
    print(
        f"server RSS: {before[0]:.0f} MiB before, peak {after[1]:.0f} MiB after "
        f"{4 * mb:.0f} MiB received (growth of the peak {after[1] - before[1]:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
