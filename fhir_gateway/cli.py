"""The `fhir-gateway` command line (typer + rich): serve, worker, token, cases, jobs, demo.

Data goes to stdout, logs to stderr. Errors end with a one-line reason and a non-zero exit.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, TextIO, cast

import sqlalchemy.exc
import typer
from pydantic import ValidationError as PydanticValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from fhir_gateway import jobs
from fhir_gateway.errors import ConfigError, GatewayError
from fhir_gateway.logging import configure_logging
from fhir_gateway.settings import Settings, ensure_data_dir, secret_problems
from fhir_gateway.store import Store

if TYPE_CHECKING:
    import socket

app = typer.Typer(
    pretty_exceptions_show_locals=False,  # local variables can hold patient data
    no_args_is_help=True,
    add_completion=False,
    help="fhir-gateway: cancer second-opinion records in, reports out.",
)
PIPE_WIDTH = 400  # off a terminal: tables take their natural width, ids and URLs stay whole


def _console(*, stderr: bool = False) -> Console:
    """A rich console; piped or redirected (no terminal, no COLUMNS) it does not wrap at 80."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=PIPE_WIDTH)
    return console


out = _console()
err = _console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="data directory (default ./data or FHIR_GATEWAY_DATA_DIR)"),
]


def _settings(data_dir: Path | None) -> Settings:
    """Settings from the environment (and `--data-dir`); a bad value is one line, exit 2."""
    try:
        settings = Settings(data_dir=data_dir) if data_dir is not None else Settings()
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"setting {where}: {first['msg']} (FHIR_GATEWAY_* or .env)") from exc
    if settings.data_dir.exists():  # a fault (not a directory, not writable): one line, exit 2
        ensure_data_dir(settings)
    return settings


def _make_data_dir(settings: Settings) -> None:
    """Create the data directory for commands that start something new (serve, token, keys).

    Raises:
        ConfigError: it cannot be created (a file in the way, no permission).
    """
    ensure_data_dir(settings)


def _existing_store(settings: Settings) -> Store:
    """Open the gateway's database for commands that read it (cases, jobs, deliveries, ...):
    never a new empty one because the command ran in the wrong directory.

    Raises:
        ConfigError: no database in the data directory.
    """
    from fhir_gateway.store import open_store

    if settings.database_url is None:
        if not settings.data_dir.is_dir():
            raise ConfigError(
                f"no gateway database in data directory {settings.data_dir.resolve()}: the "
                "directory does not exist; pass --data-dir or set "
                "FHIR_GATEWAY_DATA_DIR to the directory `serve` uses "
                "(`fhir-gateway init DIR` makes a new one)"
            )
        db = settings.data_dir / "gateway.db"
        if not db.is_file():
            raise ConfigError(
                f"no gateway database in data directory {settings.data_dir.resolve()} "
                f"({db.name} not found): pass --data-dir or set FHIR_GATEWAY_DATA_DIR to the "
                "directory `serve` uses (`fhir-gateway init DIR` makes a new one)"
            )
    return open_store(settings.db_url, key_dir=settings.data_dir / "keys")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8080,
    data_dir: DataDir = None,
    workers: Annotated[
        int | None, typer.Option(help="job worker threads (default from settings)")
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(min=1, help="HTTP processes (default from settings: 1)"),
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
    missing = secret_problems(settings.partners)
    if missing:
        _fail(
            f"partners file names secrets that are missing ({len(missing)}): "
            + "; ".join(missing)
            + " (fhir-gateway partners check lists them)"
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
    _make_data_dir(settings)
    application = create_app(settings, workers=count)  # config errors: one line, exit 2
    n = processes or settings.processes or 1
    if n > 1 and settings.db_url.startswith("sqlite") and "///" not in settings.db_url:
        n = 1  # an in-memory database lives in one process
    note = "" if public else " (the bind; set FHIR_GATEWAY_PUBLIC_BASE_URL to how callers reach us)"
    err.print(f"public base URL {settings.base_url}{note}", markup=False, highlight=False)
    # Our middleware writes the access log (route templates, no query strings) and applies
    # X-Forwarded-* from `trusted_proxies` only; uvicorn's own would trust 127.0.0.1 always.
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,
    }
    if n == 1:
        uvicorn.run(application, **options)
        return
    from uvicorn.supervisors import Multiprocess

    from fhir_gateway.listeners import Listener, reserve_port

    try:
        options["port"] = reserve_port(host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    _prepare_processes(settings, count)
    config = uvicorn.Config(
        "fhir_gateway.app:serve_process_app",
        factory=True,
        workers=n,
        # a process answers the parent's health pings from a thread: on a busy machine 5 s
        # (uvicorn's default) is too short and it would kill a healthy process
        timeout_worker_healthcheck=60,
        **options,
    )
    # Each process gets a socket of its own on the port (SO_REUSEPORT), not one shared socket:
    # connections that arrive together are spread over the processes (`listeners`).
    listener = cast("socket.socket", Listener(host, options["port"]))
    Multiprocess(config, sockets=[listener]).run()  # SIGINT and SIGTERM: its handlers


def _prepare_processes(settings: Settings, job_threads: int) -> None:
    """What `serve --processes N` does once before starting N processes: migrate the schema,
    make the keys each process reads (audit HMAC key, token and session keys), empty the
    multiprocess metrics directory, and put the settings the processes need (data dir, public
    base URL, job worker threads) in the environment they inherit."""
    import shutil

    from fhir_gateway.metrics import MULTIPROC_ENV
    from fhir_gateway.security.audit import audit_key
    from fhir_gateway.security.auth import web_session_key
    from fhir_gateway.store import open_store

    store = open_store(settings.db_url, key_dir=settings.data_dir / "keys")
    audit_key(store.key_dir)
    store.dispose()
    web_session_key(settings.data_dir)  # the access token key: TokenValidator made it
    metrics_dir = settings.data_dir / "run" / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(metrics_dir.resolve())
    os.environ["FHIR_GATEWAY_DATA_DIR"] = str(settings.data_dir.resolve())
    os.environ["FHIR_GATEWAY_PUBLIC_BASE_URL"] = settings.base_url
    os.environ["FHIR_GATEWAY_JOBS__WORKERS"] = str(job_threads)


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
    _make_data_dir(settings)
    configure_logging(settings.log_format, settings.log_level)
    store = open_store(settings.db_url, key_dir=settings.data_dir / "keys")
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
def mllp(
    port: Annotated[int, typer.Option(help="port to listen on (MLLP, HL7 v2)")],
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    data_dir: DataDir = None,
    workers: Annotated[
        int, typer.Option(help="job worker threads in this process (0: `serve`/`worker` route)")
    ] = 0,
) -> None:
    """Receive HL7 v2 messages over MLLP: each is stored in the database before its ACK (AA);
    what cannot be accepted is answered AE/AR with the reason. See docs/hl7v2.md."""
    from connectors.mllp import serve as serve_mllp
    from fhir_gateway import job_handlers
    from fhir_gateway.intake.v2inbox import V2Inbox
    from fhir_gateway.store import open_store

    settings = _settings(data_dir)
    configure_logging(settings.log_format, settings.log_level)
    _make_data_dir(settings)
    store = open_store(settings.db_url, key_dir=settings.data_dir / "keys")
    running: list[jobs.Worker] = []
    if workers > 0:
        job_handlers.register_all()
        running = jobs.start_worker_threads(store, settings, workers)

    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        serve_mllp(V2Inbox(store), host, port)
    except KeyboardInterrupt:
        pass
    finally:
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
    _make_data_dir(settings)
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
    from fhir_gateway.store.models import Case, Job

    settings = _settings(data_dir)
    store = _existing_store(settings)
    table = Table(title="cases")
    table.add_column("case", no_wrap=True)
    for col in ("status", "partner", "created"):
        table.add_column(col)
    table.add_column("jobs", overflow="fold")
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
    from fhir_gateway.store.models import Job

    settings = _settings(data_dir)
    store = _existing_store(settings)
    table = Table(title="jobs")
    table.add_column("job", no_wrap=True)
    table.add_column("kind")
    table.add_column("case", no_wrap=True)
    for col in ("state", "attempts"):
        table.add_column(col)
    table.add_column("last error", overflow="fold")
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

    settings = _settings(data_dir)
    configure_logging(settings.log_format, "WARNING")
    store = _existing_store(settings)
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
        Path | None,
        typer.Option(
            help='JSON list of SMART clients: [{"client_id": ..., "jwks": {...} or '
            '"jwks_file": "...", "scopes": [...] (default system/*.cruds)}]'
        ),
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

    store = _existing_store(settings)
    try:
        with store.session() as s:
            rows = drafts.failed_deliveries(s) if failed_only else drafts.all_deliveries(s)
    finally:
        store.dispose()
    table = Table(title="failed deliveries" if failed_only else "deliveries")
    table.add_column("delivery", no_wrap=True)
    table.add_column("case", no_wrap=True)
    for col in ("version", "action", "status", "attempts", "HTTP", "next"):
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

    store = _existing_store(settings)
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
    _make_data_dir(settings)
    path = settings.data_dir / "keys" / f"{name}.pem"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    jwk = new_key(path, "EC" if kind.upper() == "EC" else "RSA", kid or name)
    err.print(f"private key written to {path}")
    print(json.dumps(jwk, indent=2))


viewer_app = typer.Typer(no_args_is_help=True, help="The OHIF image viewer served at /viewer.")
app.add_typer(viewer_app, name="viewer")


@viewer_app.command("install")
def viewer_install(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="where to put it (default: viewer.dir, else <data dir>/viewer)"),
    ] = None,
    version: Annotated[str, typer.Option(help="npm version or range of @ohif/app")] = "3.13",
    gateway_url: Annotated[
        str | None,
        typer.Option(
            help="configure for a viewer served from another origin, reading this gateway "
            "(CORS on the gateway, bearer token from the page's sessionStorage)"
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Install OHIF Viewer (npm pack @ohif/app, needs Node.js and npm) and write its
    app-config.js for the gateway's per-case DICOMweb; serve restarts are not needed."""
    from fhir_gateway.viewer import install

    settings = _settings(data_dir)
    target = directory or settings.viewer_dir
    done = install(target, version=version, gateway_url=gateway_url)  # ConfigError: one line
    err.print(
        f"OHIF {done.version} installed in {done.directory} "
        f"({done.files} files, {done.bytes / 1e6:.0f} MB); served at /viewer"
    )
    if directory is not None and settings.viewer.dir != directory:
        err.print(f"set FHIR_GATEWAY_VIEWER__DIR={done.directory} for `serve` to use it")


KEY_NAME = "gateway"  # init's SMART client key: keys/gateway.pem (+ gateway.jwks.json)
KEY_KID = "gateway-1"


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="the new data directory")],
    org_name: Annotated[
        str, typer.Option(help="our organisation's name (reports, Task.owner)")
    ] = "Second-opinion service",
    kind: Annotated[str, typer.Option(help="key type: EC (ES384) or RSA (RS384)")] = "EC",
) -> None:
    """Make a data directory for your own instance: the database, a SMART client key pair and a
    commented partners.toml to fill in."""
    import json
    import uuid
    from importlib import resources

    from fhir_gateway.security.client_keys import new_key
    from fhir_gateway.store import open_store

    if kind.upper() not in ("EC", "RSA"):
        _fail("--kind must be EC or RSA")
    partners = directory / "partners.toml"
    if partners.exists() or (directory / "gateway.db").exists():
        _fail(f"{directory.resolve()} is already a data directory (partners.toml or gateway.db)")
    settings = _settings(directory)
    _make_data_dir(settings)
    keys = directory / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    jwk = new_key(keys / f"{KEY_NAME}.pem", "EC" if kind.upper() == "EC" else "RSA", KEY_KID)
    (keys / f"{KEY_NAME}.jwks.json").write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
    template = (resources.files("fhir_gateway") / "partners-template.toml").read_text("utf-8")
    partners.write_text(
        template.format(
            org_name=org_name.replace('"', "'"),
            org_uuid=uuid.uuid4(),
            key_name=KEY_NAME,
            kid=KEY_KID,
        ),
        encoding="utf-8",
    )
    open_store(settings.db_url, key_dir=settings.data_dir / "keys").dispose()  # migrated
    where = directory.resolve()
    out.print(f"data directory {where}:", markup=False, highlight=False)
    out.print("  gateway.db                 the database", markup=False, highlight=False)
    out.print(
        f"  keys/{KEY_NAME}.pem        our SMART client key (kid {KEY_KID}, mode 0600)",
        markup=False,
        highlight=False,
    )
    out.print(
        f"  keys/{KEY_NAME}.jwks.json  its public JWK Set: give it to each partner's EHR",
        markup=False,
        highlight=False,
    )
    out.print("  partners.toml           register your partners here", markup=False)
    out.print(
        f"next: edit {partners}, then `fhir-gateway partners check --data-dir {directory} "
        f"--probe`, then `fhir-gateway serve --data-dir {directory}` (docs/onboarding.md)",
        markup=False,
        highlight=False,
    )


partners_app = typer.Typer(no_args_is_help=True, help="The partners file.")
app.add_typer(partners_app, name="partners")


@partners_app.command("check")
def partners_check(
    data_dir: DataDir = None,
    probe: Annotated[
        bool, typer.Option("--probe", help="also try each partner's SMART discovery and a token")
    ] = False,
) -> None:
    """Check the partners file: every key file and environment variable it names (and with
    --probe, each endpoint). One line per problem; exit 1 when there is any."""
    from fhir_gateway.records.partner_clients import probe_endpoint
    from fhir_gateway.records.pull import PULL_TYPES
    from fhir_gateway.reports.delivery import DELIVERY_TYPES

    settings = _settings(data_dir)
    path = settings.partners_file or settings.data_dir / "partners.toml"
    if not path.is_file():
        _fail(
            f"no partners file at {path.resolve()} (FHIR_GATEWAY_PARTNERS_FILE, or "
            "`fhir-gateway init DIR` writes one)",
            code=1,
        )
    partners = settings.partners
    problems = [] if partners.partners else [f"{path}: no partners registered yet"]
    problems += secret_problems(partners)
    probed = 0
    if probe:
        for i, partner in enumerate(partners.partners):
            endpoints = (
                ("fhir", partner.fhir, (*PULL_TYPES, "Binary"), "rs"),
                ("dicomweb", partner.dicomweb, ("ImagingStudy",), "rs"),
                ("destination", partner.destination, DELIVERY_TYPES, "crus"),
            )
            for name, endpoint, types, access in endpoints:
                if endpoint is None:
                    continue
                probed += 1
                where = f"partners.{i}.{name} ({partner.id}) {endpoint.base_url}"
                problems += [
                    f"{where}: {p}"
                    for p in probe_endpoint(endpoint, resource_types=types, access=access)
                ]
    for problem in problems:
        out.print(problem, markup=False, highlight=False, soft_wrap=True)
    summary = f"{path}: {len(partners.partners)} partner(s)"
    summary += f", {probed} endpoint(s) probed" if probe else ""
    summary += f": {len(problems)} problem(s)" if problems else ": ok"
    err.print(summary, markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)


audit_app = typer.Typer(no_args_is_help=True, help="The audit log.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None) -> None:
    """Recompute the keyed audit chain and check its signed checkpoint; exit 1 naming what is
    wrong (an altered row, a chain recomputed without the key, the newest rows deleted)."""
    from fhir_gateway.security import audit

    settings = _settings(data_dir)
    store = _existing_store(settings)
    with store.session() as s:
        result = audit.verify(s)
    store.dispose()
    if not result.ok:
        _fail(
            f"audit chain NOT verified (checked {result.count} events): "
            + "; ".join(result.problems),
            code=1,
        )
    out.print(f"audit chain verified: {result.count} events, checkpoint signed")


held_app = typer.Typer(
    no_args_is_help=True, help="Items the identity check held out of their case (admin)."
)
app.add_typer(held_app, name="held")


@held_app.command("list")
def held_list(
    data_dir: DataDir = None,
    state: Annotated[
        str, typer.Option(help="held (awaiting a decision), released, rejected or all")
    ] = "held",
    case: Annotated[str | None, typer.Option(help="only this case")] = None,
) -> None:
    """Held studies and pulled patients, with the names of the fields that differ."""
    if state not in ("held", "released", "rejected", "all"):
        _fail("--state must be held, released, rejected or all")
    out.print(held_table(_settings(data_dir), None if state == "all" else state, case))


@held_app.command("release")
def held_release(
    held_id: Annotated[str, typer.Argument(help="the held item (an id from `held list`)")],
    data_dir: DataDir = None,
) -> None:
    """Release a held item into its case; the case is normalised again (queued)."""
    out.print(held_decide(_settings(data_dir), held_id, "released"))


@held_app.command("reject")
def held_reject(
    held_id: Annotated[str, typer.Argument(help="the held item (an id from `held list`)")],
    data_dir: DataDir = None,
) -> None:
    """Reject a held item: it stays out of its case (kept, marked rejected)."""
    out.print(held_decide(_settings(data_dir), held_id, "rejected"))


def held_table(settings: Settings, state: str | None, case_id: str | None = None) -> Table:
    """`fhir-gateway held list`: one row per held item (ids and field names only)."""
    from fhir_gateway.casebundle import held
    from fhir_gateway.store import open_store

    store = open_store(settings.db_url)
    table = Table(title="identity holds")
    for col in ("held item", "case", "what", "outcome", "fields that differ", "state"):
        table.add_column(col)
    try:
        with store.session() as s:
            for row in held.list_items(s, case_id, state):
                item = held.item_view(row)
                table.add_row(
                    item["id"],
                    item["case"],
                    item["what"],
                    item["outcome"],
                    ", ".join(item["differ"]) or f"(unconfirmed: {', '.join(item['unconfirmed'])})",
                    item["state"],
                )
    finally:
        store.dispose()
    return table


def held_decide(settings: Settings, held_id: str, decision: str) -> str:
    """Release or reject a held item as the operator on this host (audited as `cli:<user>`).

    Raises:
        NotFoundError: no such held item. ConflictError: already decided.
    """
    import getpass

    from fhir_gateway.casebundle import held
    from fhir_gateway.errors import NotFoundError
    from fhir_gateway.security.audit import Actor
    from fhir_gateway.store import open_store
    from fhir_gateway.store.models import HeldItem

    store = open_store(settings.db_url)
    try:
        with store.session() as s:
            row = s.get(HeldItem, held_id)
            if row is None:
                raise NotFoundError("no held item with this id")
            item = held.decide(
                s, row.case_id, held_id, decision, Actor(f"cli:{getpass.getuser()}", "admin")
            )
            what = (
                "released; the case is normalised again" if decision == "released" else "rejected"
            )
            return f"held item {item.id} (case {item.case_id}) {what}"
    finally:
        store.dispose()


v2_app = typer.Typer(
    no_args_is_help=True, help="HL7 v2 messages received over MLLP and held for an operator."
)
app.add_typer(v2_app, name="v2")


@v2_app.command("list")
def v2_list(
    data_dir: DataDir = None,
    state: Annotated[
        str, typer.Option(help="held (default), matched, assigned, referral, discarded or all")
    ] = "held",
) -> None:
    """Received HL7 v2 messages: type, sender, control id, state and the rule that held them."""
    out.print(v2_table(_settings(data_dir), None if state == "all" else state))


@v2_app.command("assign")
def v2_assign(
    message_id: Annotated[str, typer.Argument(help="a held message (an id from `v2 list`)")],
    case_id: Annotated[str, typer.Argument(help="the case it belongs to")],
    data_dir: DataDir = None,
) -> None:
    """Put a held result message into a case; the case is normalised again (queued)."""
    out.print(v2_decide(_settings(data_dir), message_id, case_id))


@v2_app.command("discard")
def v2_discard(
    message_id: Annotated[str, typer.Argument(help="a held message (an id from `v2 list`)")],
    data_dir: DataDir = None,
) -> None:
    """Discard a held message (kept stored, marked discarded)."""
    out.print(v2_decide(_settings(data_dir), message_id, None))


def v2_table(settings: Settings, state: str | None) -> Table:
    """`fhir-gateway v2 list`: one row per message (ids, type, sender, state; no content)."""
    from fhir_gateway.intake import v2inbox

    store = _existing_store(settings)
    table = Table(title="HL7 v2 messages")
    for col in ("message", "type", "sender", "control id", "received", "state", "rule", "case"):
        table.add_column(col)
    try:
        with store.session() as s:
            for row in v2inbox.list_messages(s, state):
                v = v2inbox.message_view(row)
                table.add_row(
                    v["id"],
                    v["type"],
                    f"{v['sendingApplication']}@{v['sendingFacility']}",
                    v["controlId"],
                    v["received"],
                    v["state"],
                    v["reason"] or "",
                    v["case"] or "",
                )
    finally:
        store.dispose()
    return table


def v2_decide(settings: Settings, message_id: str, case_id: str | None) -> str:
    """Assign (case_id given) or discard a held message as the operator on this host (audited
    as `cli:<user>`).

    Raises:
        NotFoundError: no such message or case. ConflictError: not held, or the case is closed.
    """
    import getpass

    from fhir_gateway.intake import v2inbox
    from fhir_gateway.security.audit import Actor

    who = Actor(f"cli:{getpass.getuser()}", "admin")
    store = _existing_store(settings)
    try:
        with store.session() as s:
            if case_id is None:
                row = v2inbox.discard(s, message_id, who)
                return f"message {row.id} discarded"
            row = v2inbox.assign(s, message_id, case_id, who, settings)
            return f"message {row.id} assigned to case {case_id}; the case is normalised again"
    finally:
        store.dispose()


@app.command()
def demo(
    keep: Annotated[
        bool,
        typer.Option(
            help="leave the stack running (until Ctrl-C) with the reviewer workspace at /app, "
            "and keep the temporary data directory"
        ),
    ] = False,
) -> None:
    """Run the main job on embedded defaults: start the service, push a referral, show the case."""
    from fhir_gateway.demo import run_demo

    raise typer.Exit(run_demo(out, keep=keep, err=err))


def main() -> None:
    """Console entry point: our errors become a one-line reason and exit code 2."""
    # Until a command configures logging itself (serve, worker), warnings only and to stderr:
    # stdout is the command's data.
    configure_logging("console", "WARNING")
    try:
        app()
    except GatewayError as exc:
        err.print(f"error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
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
