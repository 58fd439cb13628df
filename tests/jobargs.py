"""The Spark jobs' command lines as the tests call them (their stores hold random vectors)."""

from __future__ import annotations

from pathlib import Path


def fit_argv(root: Path, version: str, flags: str = "") -> list[str]:
    """``fit_lsh``'s arguments for the store under ``root``; ``flags`` as a user types them.

    These stores hold random vectors and no thumbnails, so the copy verifier has nothing to
    look at: near-duplicates are the distance rule's unless ``flags`` ask for the verifier."""
    verifier = [] if "--duplicate-verifier" in flags else ["--duplicate-verifier", "none"]
    return [
        "--data-root",
        str(root),
        "--backbone",
        "random",
        "--version",
        version,
        *verifier,
        *flags.split(),
    ]


def query_argv(root: Path, version: str, run_dir: Path, flags: str = "") -> list[str]:
    """``query_lsh``'s arguments: answer ``run_dir``'s queries with ``version``."""
    return [
        "--data-root",
        str(root),
        "--version",
        version,
        "--run-dir",
        str(run_dir),
        *flags.split(),
    ]
