"""Permanent errors fail a task at once (imgsim.errors): no retry repeats a damaged version,
a failed validation or a bad projection minutes later."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from airflow.sdk import exceptions

from imgsim.ann.projection import ProjectionError
from imgsim.catalog import LabelCoverageError
from imgsim.embedding.trained import EmbedderDamaged
from imgsim.errors import describe, fail_fast, is_permanent
from imgsim.query.lookup import BackboneMismatch
from imgsim.sources.download import DownloadError
from imgsim.versions.models import ValidationFailed, VersionDamaged, VersionNotFound

DAGS = Path(__file__).resolve().parents[1] / "dags"


@pytest.mark.parametrize(
    "error",
    [
        VersionDamaged("v1", ["manifest.json is not valid JSON"]),
        VersionNotFound("model version v1 not found"),
        ValidationFailed("version v1 failed validation: recall"),
        ProjectionError("the projection's sha256 differs"),
        LabelCoverageError("the labels match 0 of 48 images"),
        BackboneMismatch("the version was built with another backbone"),
        EmbedderDamaged("e1", ["weights.pt is missing"], Path("models/embedder/e1")),
        DownloadError("HTTP 404", permanent=True),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_permanent_error_fails_at_once_with_its_class_and_text(error: Exception) -> None:
    assert is_permanent(error)
    with pytest.raises(exceptions.AirflowFailException) as info, fail_fast():
        raise error
    assert str(info.value) == describe(error) == f"{type(error).__name__}: {error}"
    assert info.value.__cause__ is error


@pytest.mark.parametrize(
    "error",
    [OSError("No space left on device"), DownloadError("timed out", permanent=False)],
    ids=["disk", "transient download"],
)
def test_a_transient_error_is_left_to_the_retries(error: Exception) -> None:
    assert not is_permanent(error)
    with pytest.raises(type(error)), fail_fast():
        raise error
    # ... unless a lower level already retried it
    assert is_permanent(error, retried=(type(error),))


def test_every_task_body_of_the_index_and_query_dags_fails_fast() -> None:
    """Each @task of imgsim_index and imgsim_query (but the lease's own) calls imgsim inside
    ``fail_fast``, so a permanent error in any of them is never retried."""
    for name in ("imgsim_index.py", "imgsim_query.py"):
        tree = ast.parse((DAGS / name).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or not any(
                "task" in ast.unparse(d) for d in fn.decorator_list
            ):
                continue
            if fn.name in ("take_lease", "release_lease"):
                continue  # the lease fails or reschedules by itself (runlease.take_for_run)
            withs = [n for n in ast.walk(fn) if isinstance(n, ast.With)]
            assert any(
                "fail_fast" in ast.unparse(w.items[0]) or "index_task" in ast.unparse(w.items[0])
                for w in withs
            ), (name, fn.name)
