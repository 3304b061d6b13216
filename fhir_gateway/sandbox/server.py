"""Run the sandbox EHR with uvicorn on loopback: blocking (`run_sandbox`) or in a thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import uvicorn

from fhir_gateway.errors import ConfigError
from fhir_gateway.sandbox.app import SandboxClient, SandboxConfig, SandboxState, create_sandbox_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_sandbox(
    port: int,
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    clients_file: Path | None = None,
    require_auth: bool = True,
    **settings: Any,
) -> None:
    """Serve the sandbox EHR until interrupted (`fhir-gateway sandbox --port P --data DIR`).

    `clients_file`: see `load_clients`.
    """
    clients = load_clients(clients_file) if clients_file is not None else {}
    config = SandboxConfig(
        data_dir=data_dir, clients=clients, require_auth=require_auth, **settings
    )
    uvicorn.run(create_sandbox_app(config), host=host, port=port, log_level="warning")


def load_clients(path: Path) -> dict[str, SandboxClient]:
    """The sandbox's registered SMART backend clients, from a JSON list:

    ```json
    [{"client_id": "fhir-gateway", "jwks_file": "data/keys/gateway.jwks.json",
      "scopes": ["system/*.rs"]}]
    ```

    Each entry: `client_id`; its public keys as `jwks` (a JWK Set inline) or `jwks_file` (a JWK
    Set file, relative to the clients file, e.g. the one `fhir-gateway init` writes); `scopes`,
    the scopes it may be granted (optional; default `system/*.cruds`, everything).

    Raises:
        ConfigError: unreadable file, not JSON, or an entry without client_id or keys.
    """
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read sandbox clients file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"sandbox clients file {path} is not JSON: {exc}") from exc
    if not isinstance(rows, list):
        raise ConfigError(f"sandbox clients file {path}: expected a JSON list of clients")
    clients: dict[str, SandboxClient] = {}
    for i, row in enumerate(rows):
        where = f"sandbox clients file {path}: entry {i}"
        if not isinstance(row, dict) or not isinstance(row.get("client_id"), str):
            raise ConfigError(f"{where}: needs a client_id")
        jwks = row.get("jwks")
        if jwks is None and isinstance(row.get("jwks_file"), str):
            jwks_path = path.parent / row["jwks_file"]
            try:
                jwks = json.loads(jwks_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{where}: cannot read jwks_file {jwks_path}: {exc}") from exc
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ConfigError(f"{where}: needs jwks (a JWK Set) or jwks_file")
        scopes = row.get("scopes")
        if scopes is not None and (
            not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes)
        ):
            raise ConfigError(f"{where}: scopes must be a list of strings")
        client = (
            SandboxClient(row["client_id"], jwks)
            if scopes is None
            else SandboxClient(row["client_id"], jwks, tuple(scopes))
        )
        clients[client.client_id] = client
    return clients


class AppServer:
    """An ASGI app on a free loopback port in a background thread (tests, benchmarks, demo)."""

    def __init__(self, app: Any, port: int | None = None, *, lifespan: bool = False) -> None:
        """`lifespan`: run the app's startup/shutdown (the gateway opens its store there)."""
        self.app = app
        self.port = port or free_port()
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                proxy_headers=False,  # the app decides whom to trust (settings.trusted_proxies)
                lifespan="on" if lifespan else "off",
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise ConfigError(f"{type(self).__name__} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SandboxServer(AppServer):
    """The sandbox EHR on a free loopback port in a background thread."""

    def __init__(self, config: SandboxConfig, port: int | None = None) -> None:
        super().__init__(create_sandbox_app(config), port)

    @property
    def state(self) -> SandboxState:
        state: SandboxState = self.app.state.sandbox
        return state

    @property
    def base_url(self) -> str:
        return f"{self.url}/fhir"
