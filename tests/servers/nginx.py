"""Start a real nginx (Debian) terminating TLS in front of the gateway, for tests (DESIGN.md
"Real components").

`run_nginx` writes a throwaway self-signed certificate for 127.0.0.1 (made with `cryptography`)
and a config under a temp prefix (pid, logs and temp paths there, a free loopback port), runs
`nginx -p PREFIX -c CONF -e ERRORLOG -g 'daemon off;'` and waits until TLS answers. The proxy
connects upstream from `proxy_bind` (127.0.0.2 by default), so the gateway can tell the proxy
from a client on 127.0.0.1 and trust forwarded headers from the proxy only. The site mirrors the
one in docs/deploy.md: forwarded headers, request id, body size, streaming timeouts, and an
access log without paths or query strings.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fhir_gateway.sandbox.server import free_port
from tests.servers.postgres import skip_or_fail

NGINX_BIN = os.environ.get("FHIR_GATEWAY_NGINX_BIN", "/usr/sbin/nginx")
PROXY_ADDRESS = "127.0.0.2"  # the proxy's own address towards the gateway

CONFIG = """\
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    # no $request / $uri / $args: paths and query strings can carry identifiers
    log_format gateway '$remote_addr [$time_iso8601] $request_method $status '
                       '$body_bytes_sent $request_time rid=$request_id';
    access_log {prefix}/access.log gateway;
    upstream gateway {{
        server 127.0.0.1:{upstream_port};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 25m;
        location / {{
            proxy_pass http://gateway;
            proxy_bind {proxy_address};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-ID $request_id;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"""


def require_nginx() -> None:
    if not Path(NGINX_BIN).exists():
        skip_or_fail(f"nginx not installed (missing {NGINX_BIN}; Debian package nginx)")


@dataclass
class NginxServer:
    port: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        """The self-signed certificate, for `requests(..., verify=ca)`."""
        return str(self.prefix / "cert.pem")

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"


def self_signed(prefix: Path, host: str = "127.0.0.1") -> None:
    """A throwaway P-256 certificate for `host` (an IP SAN), valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    (prefix / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = prefix / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)


def _tls_answers(port: int, ca: str) -> bool:
    ctx = ssl.create_default_context(cafile=ca)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1) as sock,
            ctx.wrap_socket(sock, server_hostname="127.0.0.1"),
        ):
            return True
    except OSError:
        return False


@contextmanager
def run_nginx(prefix: Path, upstream_port: int, timeout_s: float = 20.0) -> Iterator[NginxServer]:
    """nginx on a free loopback port proxying to 127.0.0.1:`upstream_port`; stopped on exit."""
    require_nginx()
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    self_signed(prefix)
    server = NginxServer(port=free_port(), prefix=prefix)
    conf = prefix / "nginx.conf"
    conf.write_text(
        CONFIG.format(
            # As root the workers would drop to `nobody`, who cannot enter a 0700 temp dir.
            user="user root;\n" if os.geteuid() == 0 else "",
            prefix=prefix,
            port=server.port,
            upstream_port=upstream_port,
            proxy_address=PROXY_ADDRESS,
        ),
        encoding="utf-8",
    )
    cmd = [NGINX_BIN, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    with (prefix / "stderr.log").open("wb") as err:
        process = subprocess.Popen([*cmd, "-g", "daemon off;"], stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + timeout_s
        while not _tls_answers(server.port, server.ca):
            if process.poll() is not None:
                log = (prefix / "error.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nginx exited early: {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not answer within {timeout_s}s")
            time.sleep(0.05)
        yield server
    finally:
        process.terminate()  # SIGTERM: fast shutdown
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(prefix / "tmp", ignore_errors=True)
