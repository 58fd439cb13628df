"""The Spark jobs' command lines as the tests call them (their stores hold random vectors)."""

from __future__ import annotations

from pathlib import Path


def fit_argv(root: Path, version: str, flags: str = "") -> list[str]:
    """``fit_lsh``'s arguments for the store under ``root``; ``flags`` as a user types them."""
    return ["--data-root", str(root), "--backbone", "random", "--version", version, *flags.split()]


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
