"""Settings (pydantic-settings, `FHIR_GATEWAY_` env prefix) and the partners file (TOML).

Values come from the environment, e.g. `FHIR_GATEWAY_DATABASE_URL=postgresql+psycopg://...`,
`FHIR_GATEWAY_AUTH__JWKS_URL=...`. Nothing is read at import time: `create_app(settings)` and the
CLI receive a `Settings`, tests build one directly.

Secrets (client keys, bearer tokens, passwords) are never written in the partners file: it names a
file (`*_file`) or an environment variable (`*_env`) that holds them.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from fhir_gateway.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoAuth(_Strict):
    type: Literal["none"] = "none"


class BearerAuth(_Strict):
    """A static bearer token read from a file or an environment variable."""

    type: Literal["bearer"]
    token_file: Path | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BearerAuth:
        if (self.token_file is None) == (self.token_env is None):
            raise ValueError("bearer auth needs exactly one of token_file or token_env")
        return self

    def token(self) -> SecretStr:
        return SecretStr(_read_secret(self.token_file, self.token_env, "bearer token"))


class BasicAuth(_Strict):
    type: Literal["basic"]
    username: str
    password_file: Path | None = None
    password_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BasicAuth:
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError("basic auth needs exactly one of password_file or password_env")
        return self

    def password(self) -> SecretStr:
        return SecretStr(_read_secret(self.password_file, self.password_env, "password"))


class SmartAuth(_Strict):
    """SMART Backend Services (SMART App Launch 2.2): client_credentials + private_key_jwt."""

    type: Literal["smart"]
    client_id: str
    key_file: Path  # PEM private key (RSA for RS384, EC P-384 for ES384)
    kid: str
    scopes: list[str] = Field(default_factory=list)  # empty: derived from the resource types
    token_url: str | None = None  # normally discovered from .well-known/smart-configuration


Auth = Annotated[NoAuth | BearerAuth | BasicAuth | SmartAuth, Field(discriminator="type")]


class FhirEndpoint(_Strict):
    base_url: str
    auth: Auth = NoAuth()
    timeout_s: float = 30.0
    max_parallel: int = 4  # concurrent requests to this system

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")


class RecordsEndpoint(FhirEndpoint):
    """Where the partner's records are pulled from (`[partners.fhir]`).

    `bulk`: pull with Bulk Data `$export` instead of `$everything`/search (STANDARDS BD-01..08):
    `"patient"` is a Patient-level export (`POST Patient/$export` with the case's patient in the
    `patient` parameter), `"group:<id>"` a Group-level one (`Group/<id>/$export`); either way only
    the case's patient's resources are kept. Unset (the default): `$everything` or search.
    """

    bulk: str | None = Field(default=None, pattern=r"^(patient|group:[A-Za-z0-9\-\.]{1,64})$")
    bulk_poll_min_s: float = Field(default=1.0, gt=0)  # shortest wait between status polls

    @property
    def bulk_group(self) -> str | None:
        """The Group id of a `group:<id>` export, else None."""
        return self.bulk.removeprefix("group:") if self.bulk and ":" in self.bulk else None


class DicomwebEndpoint(FhirEndpoint):
    search_by_patient: bool = True  # QIDO by PatientID in addition to the referral's studies
    issuer_of_patient_id: str | None = None


class DimseEndpoint(_Strict):
    """A legacy PACS reached through an Orthanc that has it configured as a modality."""

    orthanc_url: str
    modality: str
    auth: Auth = NoAuth()


class DestinationEndpoint(FhirEndpoint):
    report_code: str | None = None  # LOINC code of the report, per partner (default by kind)
    use_transaction: bool = False
    task_on_destination: bool = False


class RecipientEndpoint(DestinationEndpoint):
    """A further recipient of the partner's reports (e.g. the pathology lab, the primary care
    practice): delivered like the destination, each exactly once, never completing the Task."""

    name: str = Field(pattern=r"^[A-Za-z0-9\-\.]{1,64}$")

    @model_validator(mode="after")
    def _not_destination(self) -> RecipientEndpoint:
        if self.name == "destination":
            raise ValueError("a recipient cannot be named 'destination' (the treating EHR's name)")
        return self


class PartnerClient(_Strict):
    """How the partner's own systems authenticate to us: SMART Backend Services with the
    partner's registered public keys (a JWKS URL, or a JWKS file) and its pre-authorised scopes."""

    client_id: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    scopes: list[str] = Field(
        default_factory=lambda: [
            "system/Task.cruds",
            "system/ServiceRequest.crs",
            "system/Patient.crs",
            "system/Organization.c",
            "system/Practitioner.c",
            "system/PractitionerRole.c",
            "system/DocumentReference.c",
            "system/ImagingStudy.c",
            "system/Condition.c",
            "system/DiagnosticReport.c",
            "system/Observation.c",
            "system/Subscription.crud",
            "system/Communication.cr",
        ]
    )

    @model_validator(mode="after")
    def _one_source(self) -> PartnerClient:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("a partner client needs exactly one of jwks_url or jwks_file")
        return self


class PartnerIdentifier(_Strict):
    system: str
    value: str

    @property
    def token(self) -> str:
        return f"{self.system}|{self.value}"


class Partner(_Strict):
    """A partner organisation: its identifier and the systems we talk to on its behalf."""

    id: str = Field(pattern=r"^[A-Za-z0-9\-\.]{1,64}$")
    name: str
    identifier: PartnerIdentifier
    fhir: RecordsEndpoint | None = None
    dicomweb: DicomwebEndpoint | None = None
    dimse: DimseEndpoint | None = None
    destination: DestinationEndpoint | None = None
    client: PartnerClient | None = None  # the partner's systems calling us (SMART)
    # HL7 v2 over MLLP (docs/hl7v2.md): the MSH-4 sending facilities (namespace id) that are
    # this partner, PID-3.4 namespace -> FHIR identifier system, and where 360X OSU^O51
    # status messages go ("host:port").
    v2_facilities: list[str] = Field(default_factory=list)
    v2_authorities: dict[str, str] = Field(default_factory=dict)
    v2_destination: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")

    recipients: list[RecipientEndpoint] = Field(default_factory=list)  # more report copies
    # "write": each referral Task status change is written to the destination EHR's Task
    # (for partners that do not subscribe); "none": they poll or subscribe.
    task_updates: Literal["none", "write"] = "none"

    @model_validator(mode="after")
    def _unique_recipients(self) -> Partner:
        names = [r.name for r in self.recipients]
        if len(names) != len(set(names)):
            raise ValueError("recipient names must be unique within a partner")
        if self.task_updates == "write" and self.destination is None:
            raise ValueError("task_updates = 'write' needs a destination endpoint")
        return self

    def recipient(self, name: str) -> DestinationEndpoint | None:
        """The endpoint a delivery goes to: the destination, or a further recipient by name."""
        if name == "destination":
            return self.destination
        return next((r for r in self.recipients if r.name == name), None)


class OurOrganization(_Strict):
    name: str = "fhir-gateway second-opinion service"
    identifier: PartnerIdentifier = PartnerIdentifier(system="urn:fhir-gateway", value="gateway")


class PartnersFile(_Strict):
    organization: OurOrganization = OurOrganization()
    partners: list[Partner] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> PartnersFile:
        ids = [p.id for p in self.partners]
        tokens = [p.identifier.token for p in self.partners]
        if len(set(ids)) != len(ids) or len(set(tokens)) != len(tokens):
            raise ValueError("partner ids and identifiers must be unique")
        return self

    def by_id(self, partner_id: str) -> Partner | None:
        return next((p for p in self.partners if p.id == partner_id), None)

    def by_v2_facility(self, facility: str) -> Partner | None:
        """The partner whose `v2_facilities` names this MSH-4 (its namespace id, or the whole
        HD as sent)."""
        namespace = facility.split("^", 1)[0]
        return next(
            (
                p
                for p in self.partners
                if facility in p.v2_facilities or namespace in p.v2_facilities
            ),
            None,
        )

    def by_identifier(self, system: str, value: str) -> Partner | None:
        return next(
            (
                p
                for p in self.partners
                if p.identifier.system == system and p.identifier.value == value
            ),
            None,
        )


def load_partners(path: Path | None) -> PartnersFile:
    """Read and validate the partners file; a missing path means no partners.

    Raises:
        ConfigError: the file is unreadable, not TOML, or does not validate.
    """
    if path is None:
        return PartnersFile()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read partners file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"partners file {path} is not valid TOML: {exc}") from exc
    try:
        partners = PartnersFile.model_validate(data)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"partners file {path}: {where}: {first['msg']}") from exc
    return partners.model_copy(
        update={"partners": [_resolve_paths(p, path.parent) for p in partners.partners]}
    )


def _resolve_paths(partner: Partner, base: Path) -> Partner:
    """Make key/token file paths relative to the partners file absolute."""

    def fix(auth: object) -> object:
        if isinstance(auth, SmartAuth) and not auth.key_file.is_absolute():
            return auth.model_copy(update={"key_file": base / auth.key_file})
        if isinstance(auth, BearerAuth) and auth.token_file and not auth.token_file.is_absolute():
            return auth.model_copy(update={"token_file": base / auth.token_file})
        if (
            isinstance(auth, BasicAuth)
            and auth.password_file
            and not auth.password_file.is_absolute()
        ):
            return auth.model_copy(update={"password_file": base / auth.password_file})
        return auth

    updates: dict[str, object] = {}
    client = partner.client
    if client is not None and client.jwks_file and not client.jwks_file.is_absolute():
        updates["client"] = client.model_copy(update={"jwks_file": base / client.jwks_file})
    for name in ("fhir", "dicomweb", "dimse", "destination"):
        endpoint = getattr(partner, name)
        if endpoint is not None:
            updates[name] = endpoint.model_copy(update={"auth": fix(endpoint.auth)})
    if partner.recipients:
        updates["recipients"] = [
            r.model_copy(update={"auth": fix(r.auth)}) for r in partner.recipients
        ]
    return partner.model_copy(update=updates)


def secret_problems(partners: PartnersFile) -> list[str]:
    """Every key file, secret file and environment variable the partners file names that is
    missing, unreadable or empty: one line each, naming the element (`partners.0.fhir.auth`).

    Checked before `serve` starts, so a missing secret stops startup instead of failing inside
    a job later. Values are never read into the message.
    """
    problems: list[str] = []
    for i, partner in enumerate(partners.partners):
        endpoints: list[tuple[str, Any]] = [
            (name, getattr(partner, name)) for name in ("fhir", "dicomweb", "dimse", "destination")
        ]
        endpoints += [(f"recipients.{j}", r) for j, r in enumerate(partner.recipients)]
        for name, endpoint in endpoints:
            if endpoint is None:
                continue
            where = f"partners.{i}.{name}.auth ({partner.id})"
            auth = endpoint.auth
            if isinstance(auth, SmartAuth):
                problems += _file_problem(auth.key_file, "SMART key file", where)
            elif isinstance(auth, BearerAuth):
                problems += _source_problem(auth.token_file, auth.token_env, "token", where)
            elif isinstance(auth, BasicAuth):
                problems += _source_problem(
                    auth.password_file, auth.password_env, "password", where
                )
        client = partner.client
        if client is not None and client.jwks_file is not None:
            where = f"partners.{i}.client ({partner.id})"
            problems += _file_problem(client.jwks_file, "JWKS file", where)
    return problems


def _source_problem(path: Path | None, env: str | None, what: str, where: str) -> list[str]:
    if path is not None:
        return _file_problem(path, f"{what} file", where)
    if env is not None and not os.environ.get(env):
        return [f"{where}: environment variable {env} ({what}) is not set"]
    return []


def _file_problem(path: Path, what: str, where: str) -> list[str]:
    try:
        with path.open("rb") as fh:
            if not fh.read(1):
                return [f"{where}: {what} {path} is empty"]
    except FileNotFoundError:
        return [f"{where}: {what} {path} does not exist"]
    except OSError as exc:
        return [f"{where}: cannot read {what} {path}: {exc.strerror}"]
    return []


def _read_secret(path: Path | None, env: str | None, what: str) -> str:
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    assert env is not None
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"environment variable {env} ({what}) is not set")
    return value


class AuthSettings(BaseModel):
    """Who may call us. The embedded dev issuer signs HS256 tokens with a key in the data dir."""

    dev_issuer: bool = True
    allow_dev_issuer_on_public_bind: bool = False
    issuer: str | None = None  # external identity provider (production)
    jwks_url: str | None = None
    audience: str = "fhir-gateway"
    role_claim: str = "role"
    subject_claim: str = "sub"
    partner_claim: str = "partner"
    access_token_lifetime_s: int = Field(default=300, ge=30, le=300)  # SM-22: at most 300 s
    # /auth/token rate limits (token buckets, per process): every request counts against its
    # address; requests whose assertion verified also count against the client.
    token_requests_per_minute_per_address: float = Field(default=30.0, gt=0)
    token_burst_per_address: int = Field(default=20, ge=1)
    token_requests_per_minute_per_client: float = Field(default=12.0, gt=0)
    token_burst_per_client: int = Field(default=10, ge=1)


class WebSettings(BaseModel):
    """The reviewer workspace at /app: sign-in through the organisation's OpenID Connect
    provider (authorization code + PKCE), and the dev sign-in for the demo (loopback only)."""

    oidc_issuer: str | None = None  # e.g. https://login.example.org/realms/oncology
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_redirect_url: str | None = None  # default: <public_base_url>/app/auth/callback
    oidc_scopes: str = "openid profile email"
    # Dev sign-in (a named reviewer, no password): only while auth.dev_issuer is on, the public
    # base URL is loopback and the browser is on loopback.
    dev_sign_in: bool = True
    session_max_age_s: int = Field(default=8 * 3600, ge=60, le=7 * 24 * 3600)
    timeline_rows: int = Field(default=500, ge=10, le=100_000)  # rows shown on the case page


class JobSettings(BaseModel):
    workers: int = 2  # worker threads in `serve`
    lease_s: float = 60.0
    poll_s: float = 0.5
    max_attempts: int = 8
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 3600.0


class ReportSettings(BaseModel):
    """Reviewer reports and their delivery (docs/report.md)."""

    identifier_system: str = "urn:fhir-gateway:report"  # DiagnosticReport.identifier.system
    retry_window_h: float = 72.0  # keep retrying a delivery this long, then dead
    http_timeout_s: float = 30.0
    font_regular: Path | None = None  # default: the packaged DejaVuSans.ttf
    font_bold: Path | None = None
    font_fallbacks: list[Path] | None = None  # default: the packaged Droid Sans Fallback (CJK)
    max_questions_per_case: int = Field(default=5, ge=0)  # follow-up questions (422 beyond)


class NotificationSettings(BaseModel):
    """Topic-based subscriptions (R4 Backport IG 1.1.0) for partners' EHRs."""

    max_subscriptions_per_partner: int = Field(default=10, ge=0)
    min_heartbeat_s: int = Field(default=1, ge=1)  # shorter heartbeatPeriod values are refused
    timeout_s: float = Field(default=10.0, gt=0)  # per notification POST (channel timeout caps)


class Limits(BaseModel):
    max_json_bytes: int = 20 * 1024 * 1024
    max_json_depth: int = 64
    max_transaction_entries: int = Field(default=1000, ge=1)  # beyond: 413, nothing stored
    # Uploads into a case (POST /cases/{id}/documents, STOW-RS): one request's body, and one
    # file of it; a DICOM CD as a .zip is read up to max_zip_bytes unpacked. Larger: tus.
    max_upload_bytes: int = 512 * 1024 * 1024
    max_document_bytes: int = 100 * 1024 * 1024
    max_zip_bytes: int = 4 * 1024 * 1024 * 1024
    max_zip_members: int = 20_000
    # Resumable uploads (tus, /cases/{id}/uploads/): the largest Upload-Length accepted.
    max_tus_bytes: int = 8 * 1024 * 1024 * 1024


class ImageSettings(BaseModel):
    """Where pulled DICOM is kept: files under the data dir (default) or an Orthanc."""

    backend: Literal["file", "orthanc"] = "file"
    orthanc_url: str = "http://127.0.0.1:8042"
    orthanc_username: str | None = None
    orthanc_password_env: str | None = None  # name of the env var holding the password
    max_parallel_series: int = 4
    timeout_s: float = 120.0


class ViewerSettings(BaseModel):
    """The OHIF viewer served at `/viewer` and the browser session it reads images with.

    `dir`: where `fhir-gateway viewer install` put OHIF's built files (default
    `<data_dir>/viewer`); missing: `/viewer` answers 404 saying how to install it.
    """

    dir: Path | None = None
    session_lifetime_s: int = Field(default=8 * 3600, ge=60, le=24 * 3600)


class CorsSettings(BaseModel):
    """Cross-origin access to the per-case DICOMweb for a viewer served elsewhere (off by
    default): exact origins such as `https://viewer.example.org`, no wildcards."""

    allow_origins: list[str] = Field(default_factory=list)
    max_age_s: int = 600

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for item in v:
            scheme, sep, rest = item.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(
                    "cors.allow_origins entries are origins: scheme://host[:port], no path"
                )
        return v


class MetricsSettings(BaseModel):
    """Who may scrape `/metrics` without a token: client addresses or networks (as the gateway
    sees them, after trusted-proxy headers). An admin bearer token is always accepted."""

    allow_from: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])

    @field_validator("allow_from")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for item in v:
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return v


DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8080"  # `serve`'s default bind


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FHIR_GATEWAY_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    data_dir: Path = Path("data")
    database_url: str | None = None  # default: SQLite in the data dir
    partners_file: Path | None = None  # default: <data_dir>/partners.toml if it exists
    # How callers reach us: every absolute URL we hand out (SMART discovery, CapabilityStatement,
    # WADO RetrieveURL, Bundle links) is built from it, never from the request's Host header.
    # Unset: `serve` fills it from the address it binds (http://HOST:PORT).
    public_base_url: str | None = None
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto we believe (addresses or
    # networks); empty: forwarded headers are ignored and the peer address is the client.
    trusted_proxies: list[str] = Field(default_factory=list)
    # HTTP processes of `serve`; unset: 1. Measured, one process uses less CPU per referral
    # than two (the writers' handoff across processes costs more than the GIL saves), and the
    # SMART token endpoint's rate limits are per process. Job worker threads run in one of
    # them. An in-memory SQLite database gets one.
    processes: int | None = Field(default=None, ge=1)
    # glibc malloc arenas of a process (`app.limit_malloc_arenas`): by default one per thread
    # up to 8 per core, each keeping what its thread freed; 2 bound the big case's peak RSS
    # (231 -> 223 MB); intake CPU per referral unchanged within noise. 0: glibc's default.
    malloc_arena_max: int = Field(default=2, ge=0)
    metrics: MetricsSettings = MetricsSettings()
    log_format: Literal["console", "json"] = "json"
    log_level: str = "INFO"
    api_docs: bool = False  # /openapi.json, /docs, /redoc (admin token) when true
    auth: AuthSettings = AuthSettings()
    jobs: JobSettings = JobSettings()
    images: ImageSettings = ImageSettings()
    limits: Limits = Limits()
    reports: ReportSettings = ReportSettings()
    web: WebSettings = WebSettings()
    viewer: ViewerSettings = ViewerSettings()
    cors: CorsSettings = CorsSettings()

    @field_validator("public_base_url")
    @classmethod
    def _absolute_base(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ValueError("public_base_url must be an absolute http(s) URL without a query")
        return v.strip().rstrip("/")

    @property
    def base_url(self) -> str:
        """The public base URL without a trailing slash (the default bind when unset)."""
        return self.public_base_url or DEFAULT_PUBLIC_BASE_URL

    notifications: NotificationSettings = NotificationSettings()

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'gateway.db').resolve()}"

    @property
    def viewer_dir(self) -> Path:
        return self.viewer.dir or self.data_dir / "viewer"

    @cached_property
    def partners(self) -> PartnersFile:
        path = self.partners_file
        if path is None:
            default = self.data_dir / "partners.toml"
            path = default if default.exists() else None
        return load_partners(path)


def ensure_data_dir(settings: Settings) -> None:
    """Create the data directory if needed and check it (and an existing SQLite database file)
    can be written, so a fault is one line at startup rather than a traceback or a 500 later.

    Raises:
        ConfigError: the directory is not a directory, cannot be created, or is not writable;
            or the SQLite database file is not writable.
    """
    d = settings.data_dir
    if d.exists() and not d.is_dir():
        raise ConfigError(f"data directory {d} is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"data directory {d} does not exist and cannot be created ({exc.strerror})"
        ) from exc
    try:
        with tempfile.TemporaryFile(dir=d, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"data directory {d} is not writable") from exc
    if settings.database_url is None:
        db = d / "gateway.db"
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists():
                try:
                    with path.open("r+b"):
                        pass
                except OSError as exc:
                    raise ConfigError(f"database file {path} is not writable") from exc
