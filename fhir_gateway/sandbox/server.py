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

    `clients_file` is JSON: `[{"client_id": ..., "jwks": {...}, "scopes": [...]}]`.
    """
    clients = {}
    if clients_file is not None:
        try:
            rows = json.loads(clients_file.read_text(encoding="utf-8"))
            for row in rows:
                client = SandboxClient(row["client_id"], row["jwks"], tuple(row.get("scopes", ())))
                clients[client.client_id] = client
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read sandbox clients file: {exc}") from exc
    config = SandboxConfig(
        data_dir=data_dir, clients=clients, require_auth=require_auth, **settings
    )
    uvicorn.run(create_sandbox_app(config), host=host, port=port, log_level="warning")


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
