"""A durable message store for the MLLP tests: one SQLite file (WAL, synchronous=FULL), one row
per control id. Run as a script it is an MLLP listener process the tests can SIGKILL:

    python -m tests.mllp_store DB PORT_FILE [--ack-before-commit N]

`--ack-before-commit N` breaks the listener contract on purpose (commits every N messages but
answers AA at once): the kill test's negative control, proving the test can see lost messages.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import threading
from pathlib import Path

from connectors.mllp import AckDecision, MllpListener, check_message


class SqliteMessageStore:
    """`store(message) -> AckDecision`: AA once the row is committed (a repeat is AA too)."""

    def __init__(self, path: Path, *, commit_every: int = 1) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS message (control_id TEXT PRIMARY KEY, body BLOB NOT NULL)"
        )
        self._lock = threading.Lock()
        self._commit_every = commit_every
        self._pending = 0
        self.calls = 0

    def __call__(self, message: bytes) -> AckDecision:
        header, _ = check_message(message)
        assert header is not None  # the listener only stores messages that passed the check
        with self._lock:
            self.calls += 1
            if self._pending == 0:
                self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR IGNORE INTO message (control_id, body) VALUES (?, ?)",
                (header.control_id, message),
            )
            self._pending += 1
            if self._pending >= self._commit_every:
                self._db.execute("COMMIT")
                self._pending = 0
        return AckDecision.accept()

    def close(self) -> None:
        self._db.close()


def stored_control_ids(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT control_id FROM message")]
    finally:
        db.close()


def main(argv: list[str]) -> None:
    import asyncio

    parser = argparse.ArgumentParser()
    parser.add_argument("db", type=Path)
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--ack-before-commit", type=int, default=1)
    args = parser.parse_args(argv)
    store = SqliteMessageStore(args.db, commit_every=args.ack_before_commit)

    async def run() -> None:
        listener = MllpListener(store)
        await listener.start()
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(listener.port))
        os.replace(tmp, args.port_file)
        await listener.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main(sys.argv[1:])
