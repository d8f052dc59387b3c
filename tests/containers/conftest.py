"""The container check runs only when named: `python -m pytest tests/containers` (CI runs it after
the unit tests, with an engine started by tests/containers/with-engine.sh). A plain
`python -m pytest` leaves it out: it builds images for minutes and needs a Docker engine."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# What the check measured, printed at the end of the run: {"section": [(label, value), ...]}.
REPORT: dict[str, list[tuple[str, str]]] = {}


def _named_on_command_line(config) -> bool:
    start = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (start / arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if not _named_on_command_line(config):
        return True
    return None


@pytest.fixture(scope="session")
def report() -> dict[str, list[tuple[str, str]]]:
    return REPORT


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    terminalreporter.section("container check: timings and image sizes")
    for section, rows in REPORT.items():
        terminalreporter.write_line(f"{section}:")
        for label, value in rows:
            terminalreporter.write_line(f"  {label:<56} {value}")
