"""The `fhir-gateway` command line (typer + rich): serve, worker, token, cases, jobs, demo.

Data goes to stdout, logs to stderr. Errors end with a one-line reason and a non-zero exit.
"""

from __future__ import annotations

import ipaddress
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, BinaryIO, TextIO

import sqlalchemy.exc
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from fhir_gateway import jobs
from fhir_gateway.errors import GatewayError
from fhir_gateway.logging import configure_logging
from fhir_gateway.settings import Settings, ensure_data_dir

app = typer.Typer(
    pretty_exceptions_show_locals=False,  # local variables can hold patient data
    no_args_is_help=True,
    add_completion=False,
    help="fhir-gateway: cancer second-opinion records in, reports out.",
)
out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="data directory (default ./data or FHIR_GATEWAY_DATA_DIR)"),
]


def _settings(data_dir: Path | None) -> Settings:
    """Settings, with the data directory created and checked (ConfigError: one line, exit 2)."""
    settings = Settings(data_dir=data_dir) if data_dir is not None else Settings()
    ensure_data_dir(settings)
    return settings


def _fail(message: str, code: int = 2) -> None:
    err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8080,
    data_dir: DataDir = None,
    workers: Annotated[
        int | None, typer.Option(help="job worker threads (default from settings)")
    ] = None,
) -> None:
    """Run the API and job workers."""
    import uvicorn

    from fhir_gateway.app import create_app

    settings = _settings(data_dir)
    if (
        settings.auth.dev_issuer
        and not _is_loopback(host)
        and not (settings.auth.allow_dev_issuer_on_public_bind)
    ):
        _fail(
            f"refusing to bind {host} with the embedded dev token issuer on; configure "
            "FHIR_GATEWAY_AUTH__ISSUER/JWKS_URL and FHIR_GATEWAY_AUTH__DEV_ISSUER=false"
        )
    public = settings.public_base_url is not None
    if not public:
        if _is_unspecified(host):
            _fail(
                f"set FHIR_GATEWAY_PUBLIC_BASE_URL: binding {host} gives no address to "
                "advertise in SMART discovery, the CapabilityStatement and WADO URLs"
            )
        bound = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        settings = settings.model_copy(update={"public_base_url": bound})
    count = settings.jobs.workers if workers is None else workers
    application = create_app(settings, workers=count)  # config errors: one line, exit 2
    note = "" if public else " (the bind; set FHIR_GATEWAY_PUBLIC_BASE_URL to how callers reach us)"
    err.print(f"public base URL {settings.base_url}{note}", markup=False, highlight=False)
    uvicorn.run(application, host=host, port=port, log_config=None, access_log=False)


def _is_unspecified(host: str) -> bool:
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def worker(
    data_dir: DataDir = None,
    threads: Annotated[int, typer.Option(help="worker threads in this process")] = 1,
) -> None:
    """Run job workers alone (scale-out on PostgreSQL: run several on several hosts)."""
    from fhir_gateway import job_handlers
    from fhir_gateway.store import open_store

    settings = _settings(data_dir)
    configure_logging(settings.log_format, settings.log_level)
    store = open_store(settings.db_url)
    job_handlers.register_all()
    running = jobs.start_worker_threads(store, settings, threads)
    done = threading.Event()

    def stop(_sig: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    done.wait()
    jobs.stop_workers(running)
    store.dispose()


@app.command()
def token(
    role: Annotated[str, typer.Option(help="ehr, reviewer or admin")],
    sub: Annotated[str, typer.Option(help="subject (user or system name)")],
    partner: Annotated[str | None, typer.Option(help="partner id (ehr tokens)")] = None,
    ttl: Annotated[int, typer.Option(help="lifetime in seconds")] = 3600,
    data_dir: DataDir = None,
) -> None:
    """Mint a token from the embedded dev issuer; prints the token alone."""
    from fhir_gateway.security.auth import mint_dev_token

    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    print(
        mint_dev_token(
            settings.data_dir,
            role=role,
            sub=sub,
            partner=partner,
            ttl_s=ttl,
            audience=settings.auth.audience,
        )
    )


@app.command("cases")
def list_cases(
    data_dir: DataDir = None,
    status: Annotated[str | None, typer.Option(help="only cases in this status")] = None,
) -> None:
    """List cases (reads the database directly; for operators on the gateway host)."""
    from fhir_gateway.store import open_store
    from fhir_gateway.store.models import Case, Job

    settings = _settings(data_dir)
    store = open_store(settings.db_url)
    table = Table(title="cases")
    for col in ("case", "status", "partner", "created", "jobs"):
        table.add_column(col)
    with store.session() as s:
        stmt = select(Case).order_by(Case.created_at.desc())
        if status:
            stmt = stmt.where(Case.status == status)
        for case in s.scalars(stmt):
            states = [
                f"{j.kind}:{j.state}"
                for j in s.scalars(
                    select(Job).where(Job.case_id == case.id).order_by(Job.created_at)
                )
            ]
            table.add_row(
                case.id,
                case.status,
                case.partner_id,
                case.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                ", ".join(states),
            )
    store.dispose()
    out.print(table)


@app.command("jobs")
def list_jobs(
    data_dir: DataDir = None,
    state: Annotated[str | None, typer.Option(help="queued, running, done or dead")] = None,
) -> None:
    """List jobs with their state, attempts and last error."""
    from fhir_gateway.store import open_store
    from fhir_gateway.store.models import Job

    settings = _settings(data_dir)
    store = open_store(settings.db_url)
    table = Table(title="jobs")
    for col in ("job", "kind", "case", "state", "attempts", "last error"):
        table.add_column(col)
    with store.session() as s:
        stmt = select(Job).order_by(Job.created_at)
        if state:
            stmt = stmt.where(Job.state == state)
        for j in s.scalars(stmt):
            table.add_row(
                j.id, j.kind, j.case_id or "", j.state, str(j.attempts), (j.last_error or "")[:80]
            )
    store.dispose()
    out.print(table)


@app.command()
def pull(
    case_id: Annotated[str, typer.Argument(help="the case to pull records for")],
    refresh: Annotated[bool, typer.Option(help="only what changed since the last pull")] = False,
    data_dir: DataDir = None,
) -> None:
    """Pull a case's records from its partner's EHR now, with a progress bar per type."""
    from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn

    from fhir_gateway.records.pull import pull_case
    from fhir_gateway.store import open_store

    settings = _settings(data_dir)
    configure_logging(settings.log_format, "WARNING")
    store = open_store(settings.db_url)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed} resources"),
        console=err,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(resource_type: str, done: int, pages: int) -> None:
            if resource_type not in tasks:
                tasks[resource_type] = bar.add_task(resource_type, total=None)
            bar.update(
                tasks[resource_type], completed=done, description=f"{resource_type} ({pages} pages)"
            )

        result, saved = pull_case(store, settings, case_id, refresh=refresh, progress_cb=progress)
    store.dispose()
    table = Table(title=f"pulled for case {case_id}")
    table.add_column("resource type")
    table.add_column("count", justify="right")
    for rtype, count in sorted(result.counts.items()):
        table.add_row(rtype, str(count))
    out.print(table)
    out.print(
        f"added {saved.added}, updated {saved.updated}, unchanged {saved.unchanged}, "
        f"binaries {len(result.binaries)}"
        + (f"; partial: {', '.join(result.partial_types)}" if result.partial_types else "")
    )


@app.command()
def sandbox(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 8181,
    data: Annotated[Path, typer.Option(help="folder of FHIR resources (bundles, NDJSON)")] = Path(
        "fixtures/synthea"
    ),
    clients: Annotated[
        Path | None, typer.Option(help="JSON list of SMART clients (client_id, jwks, scopes)")
    ] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="serve without SMART")] = False,
) -> None:
    """Run the sandbox EHR (a FHIR R4 server with SMART backend auth) on loopback."""
    from fhir_gateway.sandbox import run_sandbox

    if not data.is_dir():
        _fail(f"sandbox data folder {data} does not exist")
    out.print(f"sandbox EHR on http://127.0.0.1:{port}/fhir (data {data})")
    run_sandbox(port, data, clients_file=clients, require_auth=not no_auth)


@app.command("map")
def map_files(
    files: Annotated[list[Path], typer.Argument(help="FHIR JSON/NDJSON, C-CDA, HL7 v2 or DICOM")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="write the Bundle here (else stdout)")
    ] = None,
) -> None:
    """Map files offline into one normalised Bundle; data-quality issues go to stderr.

    Exit 0 when it mapped, 2 with a one-line reason per unusable file."""
    configure_logging("console", "WARNING")
    raise typer.Exit(map_command(files, out_file))


@app.command("deliveries")
def list_deliveries(
    data_dir: DataDir = None,
    failed: Annotated[bool, typer.Option("--failed", help="only dead deliveries")] = False,
) -> None:
    """Report deliveries: status, attempts, last HTTP status, the EHR's message, next retry."""
    out.print(deliveries_table(_settings(data_dir), failed_only=failed))


@app.command("redeliver")
def redeliver(
    delivery_id: Annotated[str, typer.Argument(help="the dead delivery to queue again")],
    data_dir: DataDir = None,
) -> None:
    """Re-queue a dead delivery; its retry window starts again."""
    out.print(redeliver_command(_settings(data_dir), delivery_id))


def deliveries_table(settings: Settings, failed_only: bool = False) -> Table:
    """`fhir-gateway deliveries [--failed]`: one row per delivery with its last status code,
    the EHR's message and the next retry (reads the database directly, operator only)."""
    from fhir_gateway.reports import drafts
    from fhir_gateway.store import open_store

    store = open_store(settings.db_url)
    try:
        with store.session() as s:
            rows = drafts.failed_deliveries(s) if failed_only else drafts.all_deliveries(s)
    finally:
        store.dispose()
    table = Table(title="failed deliveries" if failed_only else "deliveries")
    for col in ("delivery", "case", "version", "action", "status", "attempts", "HTTP", "next"):
        table.add_column(col)
    table.add_column("last error", overflow="fold")
    for d in rows:
        table.add_row(
            d["id"],
            d["case"],
            str(d["reportVersion"]),
            d["action"],
            d["status"],
            str(d["attempts"]),
            str(d["lastStatusCode"] or ""),
            d["nextRetryAt"] or "",
            (d["lastError"] or "")[:300],
        )
    return table


def redeliver_command(settings: Settings, delivery_id: str) -> str:
    """`fhir-gateway redeliver DELIVERY_ID`: re-queue a dead delivery; returns what was done.

    Raises:
        NotFoundError: unknown delivery. ConflictError: it is not dead.
    """
    from fhir_gateway.reports import drafts
    from fhir_gateway.store import open_store

    store = open_store(settings.db_url)
    try:
        with store.session() as s:
            delivery = drafts.redeliver(s, delivery_id)
            return (
                f"delivery {delivery.id} (case {delivery.case_id}, version "
                f"{delivery.report_version}) re-queued; its retry window starts again"
            )
    finally:
        store.dispose()


def format_issue(issue: dict[str, Any]) -> str:
    """One stderr line per issue: severity, code, where, what (no payload values)."""
    where = ",".join(issue.get("expression") or [])
    return f"{issue['severity']}: {issue['code']}: {where}: {issue['diagnostics']}"


def map_command(
    files: list[Path],
    out: Path | None,
    *,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`fhir-gateway map FILE... [--out]`: issues to stderr, the bundle to `out` (or stdout).

    Returns the exit code: 0 when every file was mapped, 2 when any was unusable (one line per
    such file on stderr; the bundle of the usable ones is still written, none when none is).
    """
    err = stderr or sys.stderr
    if not files:
        print("no files given", file=err)
        return 2
    from fhir_gateway.casebundle.offline_map import map_files, write_bundle

    case, issues, failures = map_files(files)
    if len(failures) < len(files):  # with nothing mapped there is no bundle to have issues
        for issue in issues:
            print(format_issue(issue), file=err)
    for failure in failures:
        print(failure, file=err)
    if len(failures) == len(files):
        return 2
    if out is not None:
        write_bundle(case, out)
    else:
        sink = stdout or sys.stdout.buffer
        for chunk in case.iter_json():
            sink.write(chunk)
        sink.flush()
    return 2 if failures else 0


keys_app = typer.Typer(no_args_is_help=True, help="Our SMART client keys.")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Argument(help="file name under <data dir>/keys/ (.pem added)")],
    kind: Annotated[str, typer.Option(help="EC (ES384) or RSA (RS384)")] = "EC",
    kid: Annotated[str | None, typer.Option(help="key id to publish")] = None,
    data_dir: DataDir = None,
) -> None:
    """Write a new private key (mode 0600) and print its public JWK (register it, or the
    gateway's /.well-known/jwks.json, with the partner's EHR)."""
    import json

    from fhir_gateway.security.client_keys import new_key

    if kind.upper() not in ("EC", "RSA"):
        _fail("--kind must be EC or RSA")
    settings = _settings(data_dir)
    path = settings.data_dir / "keys" / f"{name}.pem"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    jwk = new_key(path, "EC" if kind.upper() == "EC" else "RSA", kid or name)
    err.print(f"private key written to {path}")
    print(json.dumps(jwk, indent=2))


audit_app = typer.Typer(no_args_is_help=True, help="The audit log.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None) -> None:
    """Recompute the audit hash chain; exit 1 naming the first altered row."""
    from fhir_gateway.security import audit
    from fhir_gateway.store import open_store

    settings = _settings(data_dir)
    store = open_store(settings.db_url)
    with store.session() as s:
        count, bad = audit.verify_chain(s)
    store.dispose()
    if bad is not None:
        _fail(f"audit chain broken at event {bad} (checked {count} events)", code=1)
    out.print(f"audit chain verified: {count} events")


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="keep the temporary data directory")] = False,
) -> None:
    """Run the main job on embedded defaults: start the service, push a referral, show the case."""
    from fhir_gateway.demo import run_demo

    run_demo(out, keep=keep)


def main() -> None:
    """Console entry point: our errors become a one-line reason and exit code 2."""
    try:
        app()
    except GatewayError as exc:
        err.print(f"error: {exc.message}", markup=False, highlight=False)
        sys.exit(2)
    except OSError as exc:  # a file or directory the command needs: one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        err.print(f"error: {exc.strerror or type(exc).__name__}{where}", markup=False)
        sys.exit(2)
    except sqlalchemy.exc.OperationalError as exc:
        err.print(f"error: the database cannot be used ({type(exc.orig).__name__})", markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
