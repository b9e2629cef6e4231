"""`make load` in small: a few seconds of the realistic mix, then its reconciliation, as a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.load.run import RECONCILED

ROOT = Path(__file__).resolve().parents[2]
# The run's own hard limit is its seconds plus 100 (call deadlines, drain, catch-up); start-up aside.
RUN_LIMIT = 150


@pytest.mark.slow
@pytest.mark.timeout(RUN_LIMIT + 30)
def test_a_short_load_run_has_no_errors_and_reconciles() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tests.load.run", "--seconds", "5", "--users", "3", "--no-write"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        check=False,
    )
    report = run.stdout
    assert run.returncode == 0, f"{report}\n{run.stderr[-3000:]}"
    assert "errors: 0;" in report, report
    assert f"reconciliation: {RECONCILED}." in report, report
    # The mix ran: writes of every kind were acknowledged, and watchers were sent messages.
    calls = {
        name: int(count.replace(",", ""))
        for name, count in re.findall(r"^\| (\w+) \| ([\d,]+) \|", report, re.M)
    }
    for name in ("AddMessage", "CreateTask", "AddDocuments", "Search"):
        assert calls.get(name, 0) > 0, f"no {name} calls: {report}"
    streamed = re.search(r"([\d,]+) messages streamed to watchers", report)
    assert streamed is not None
    assert int(streamed.group(1).replace(",", "")) > 0, report
