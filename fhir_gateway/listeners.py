"""The listening sockets of `serve --processes N`: one socket per process, all on one port.

uvicorn's multi-process mode binds one socket in its parent and every process accepts from it.
When connections arrive together (an integration engine opening its pool, a partner's replay),
the process that wakes first takes them all: asyncio accepts every pending connection on each
wake-up. Measured with 8 keep-alive clients and 2 processes: the clients landed 1/7, 3/5 and
8/0 in three runs, and the 8/0 run had one process's rate (312 against 482 and 529
referrals/s). With a socket of its own per process, each bound with SO_REUSEPORT, the kernel
hands each new connection to one of the sockets by the connection's address hash.

uvicorn's supervisor is kept (it restarts a dead process and answers SIGHUP, SIGTTIN and
SIGTTOU): it is given a `Listener` where it takes sockets, and a `Listener` becomes a socket of
its own in each process it is sent to.
"""

from __future__ import annotations

import socket
import sys
from typing import Any


def reserve_port(host: str, port: int) -> int:
    """The port `serve --processes N` will listen on (a free one for 0). Raises OSError when
    something listens there already, one of our own processes included: the probe is bound
    without SO_REUSEPORT, so a second gateway is refused the port rather than sharing it."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a restart
        probe.bind((host, port))
        return int(probe.getsockname()[1])


class Listener:
    """A listening address that is unpickled as a bound socket of its own (SO_REUSEPORT): the
    processes uvicorn spawns receive their sockets pickled."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return bind_shared, (self.host, self.port)


def bind_shared(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT (uvicorn starts listening on it). A bind that fails
    ends the process as uvicorn's own does (exit code 3: failed before serving), which stops
    the supervisor instead of having it restart the process over and over."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        sys.stderr.write(f"error: cannot listen on {host}:{port}: {exc.strerror}\n")
        from uvicorn.config import STARTUP_FAILURE

        sys.exit(STARTUP_FAILURE)
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
