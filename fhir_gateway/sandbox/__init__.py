"""Sandbox EHR: a FHIR R4 server with SMART backend auth and fault injection, for tests and demo."""

from fhir_gateway.sandbox.app import (
    Faults,
    SandboxClient,
    SandboxConfig,
    SandboxState,
    create_sandbox_app,
)
from fhir_gateway.sandbox.server import SandboxServer, run_sandbox

__all__ = [
    "Faults",
    "SandboxClient",
    "SandboxConfig",
    "SandboxServer",
    "SandboxState",
    "create_sandbox_app",
    "run_sandbox",
]
