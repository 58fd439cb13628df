"""Permanent errors: the ones no retry can fix, and how a task body fails at once on them.

A bad URL, wrong bytes, a bad archive, labels that do not fit the images, a bad setting, a
damaged model version or embedder, a fit that fails validation: retrying the task repeats the
same failure minutes later (Airflow's backoff) and hides the reason behind the retries. Their
classes inherit :class:`PermanentError` (a marker, beside their own base such as
``ValueError``); an error whose permanence depends on the case (a download: HTTP 404 against a
timeout) says so in its ``permanent`` attribute. :func:`fail_fast` turns a permanent error in a
task body into Airflow's ``AirflowFailException`` (the task fails, no retry), with the error's
class and text as its message, which is what the task log's last line and ``imgsim demo``
show; any other error is left to the task's retries.

This module imports nothing of imgsim (the bottom layer): every module may mark its errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PermanentError(Exception):
    """Marker base: no retry can fix this error (bad input, damaged data, a bad setting)."""


def is_permanent(exc: BaseException, *, retried: tuple[type[BaseException], ...] = ()) -> bool:
    """True for errors that no retry can fix; ``retried``: classes whose every error is final
    here because a lower level has retried its transient failures already (one level only)."""
    if retried and isinstance(exc, retried):
        return True
    flag = getattr(exc, "permanent", None)
    if isinstance(flag, bool):
        return flag
    return isinstance(exc, PermanentError)


def describe(exc: BaseException) -> str:
    """``ClassName: text``: what a person reads of a failed task (not its traceback)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def fail_fast(*, retried: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """For task bodies: a permanent error (:func:`is_permanent`) fails the task at once,
    without Airflow retries, re-raised as ``AirflowFailException`` with :func:`describe`'s
    message (chained to the error); any other error is left to the task's retries."""
    try:
        yield
    except Exception as exc:
        if not is_permanent(exc, retried=retried):
            raise
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(describe(exc)) from exc
