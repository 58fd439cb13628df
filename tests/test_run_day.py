"""Which drop folder a run reads: its logical date, else the day it was run for."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imgsim.pipeline import PipelineError, run_day


def test_logical_date_wins() -> None:
    assert run_day("2026-01-03", datetime(2026, 5, 1, tzinfo=UTC)) == "2026-01-03"


def test_a_run_without_logical_date_reads_its_run_after_day() -> None:
    assert run_day(None, datetime(2026, 5, 1, 23, 59, tzinfo=UTC)) == "2026-05-01"


def test_neither_date_is_an_error() -> None:
    with pytest.raises(PipelineError, match="logical date"):
        run_day(None, None)
