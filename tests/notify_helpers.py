"""A loopback rest-hook receiver (a real HTTP server on 127.0.0.1) for subscription tests, and
a job runner limited to the notification jobs."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhir_gateway import job_handlers, jobs
from fhir_gateway.notify import subscriptions
from fhir_gateway.settings import Settings
from fhir_gateway.store import Store

NOTIFY_KINDS = (
    subscriptions.HANDSHAKE,
    subscriptions.NOTIFY,
    subscriptions.HEARTBEAT,
    subscriptions.TASK_UPDATE,
)


class Receiver:
    """Records every notification Bundle POSTed to it; `stop()` and `start()` take it down and
    bring it back on the same port (connections refused meanwhile)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner._lock:
                    owner.received.append(json.loads(body))
                    owner.headers.append(dict(self.headers.items()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [b for b in self.received if notification_type(b) == kind]

    def event_numbers(self) -> list[int]:
        return [n for b in self.of_type("event-notification") for n in event_numbers(b)]


def status_params(bundle: dict[str, Any]) -> dict[str, Any]:
    params = bundle["entry"][0]["resource"]
    assert params["resourceType"] == "Parameters"
    return params  # type: ignore[no-any-return]


def param(params: dict[str, Any], name: str) -> Any:
    for p in params["parameter"]:
        if p["name"] == name:
            return next(v for k, v in p.items() if k.startswith("value"))
    return None


def notification_type(bundle: dict[str, Any]) -> str:
    return str(param(status_params(bundle), "type"))


def event_numbers(bundle: dict[str, Any]) -> list[int]:
    out = []
    for p in status_params(bundle)["parameter"]:
        if p["name"] == "notification-event":
            part = next(x for x in p["part"] if x["name"] == "event-number")
            out.append(int(part["valueString"]))
    return out


def run_notify_jobs(store: Store, settings: Settings, *, max_runs: int = 50) -> int:
    """Run due notification jobs in process with the real worker; how many ran."""
    job_handlers.register_all()
    worker = jobs.Worker(store, settings, name="notify-worker", kinds=NOTIFY_KINDS)
    runs = 0
    while runs < max_runs and worker.run_once():
        runs += 1
    return runs


def subscription(endpoint: str, **channel_ext: Any) -> dict[str, Any]:
    """A Subscription to the referral Task topic on the test gateway's base."""
    from fhir_gateway.notify import bundles

    ext = []
    if "heartbeat" in channel_ext:
        ext.append({"url": bundles.HEARTBEAT_PERIOD, "valueUnsignedInt": channel_ext["heartbeat"]})
    body: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Referral progress",
        "criteria": "http://127.0.0.1:8080/fhir/SubscriptionTopic/referral-task-status",
        "channel": {
            "extension": ext,
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {
                "extension": [
                    {
                        "url": bundles.PAYLOAD_CONTENT,
                        "valueCode": channel_ext.get("content", "id-only"),
                    }
                ]
            },
            "header": ["Authorization: Bearer receiver-secret"],
        },
    }
    if "filter" in channel_ext:
        body["_criteria"] = {
            "extension": [{"url": bundles.FILTER_CRITERIA, "valueString": channel_ext["filter"]}]
        }
    return body
