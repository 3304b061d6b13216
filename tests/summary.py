"""Lines tests want printed at the end of the run (e.g. what a second validator checked), so
CI's log shows them even though pytest captures a passing test's output."""

from __future__ import annotations

LINES: list[str] = []
