"""The chaos and fuzz figures (faults injected, records checked, lost, duplicated, fuzz cases) in
pytest's terminal summary, so the CI log shows them without ``-s``."""

from __future__ import annotations

from typing import Any

from chaos.faultkit import FIGURES


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if FIGURES:
        terminalreporter.section("chaos and fuzz figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
