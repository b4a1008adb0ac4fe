"""A finished task's record in Celery's Redis result backend, as ``AsyncResult.get()`` reads it.

``celery-task-meta-<task id>`` holds the JSON of :func:`result_meta`; a failure's ``result`` is
:func:`exception_result` of the error, from which the client rebuilds an exception of that name.
Standard library only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypedDict

__all__ = ["ExceptionResult", "ResultRecord", "exception_result", "result_meta"]


class ExceptionResult(TypedDict):
    """A FAILURE's ``result``: the exception's class name, message and module."""

    exc_type: str
    exc_message: list[str]
    exc_module: str


class ResultRecord(TypedDict):
    """The record of a finished task, field for field as Celery's Redis backend stores it."""

    status: str
    result: Any
    traceback: str | None
    children: list[Any]
    date_done: str
    task_id: str


def exception_result(exc: BaseException) -> ExceptionResult:
    """A FAILURE's ``result`` as Celery's JSON backend writes it (``prepare_exception``).

    The client rebuilds an exception of that name whose message is ``exc_message``; for imgq's
    errors that message starts with the reason code.

    >>> exception_result(ValueError("missing_argument: image"))
    {'exc_type': 'ValueError', 'exc_message': ['missing_argument: image'], 'exc_module': 'builtins'}
    """
    kind = type(exc)
    return {
        "exc_type": kind.__qualname__,
        "exc_message": [str(exc)],
        "exc_module": kind.__module__,
    }


def result_meta(
    task_id: str, state: str, result: Any, traceback: str | None = None
) -> ResultRecord:
    """The result-backend record of a finished task, exactly as Celery stores it.

    Args:
        task_id: The task's id.
        state: ``"SUCCESS"``, ``"FAILURE"`` or ``"REVOKED"``.
        result: The return value, or :func:`exception_result` of the error.
        traceback: Traceback text of a failure, or None.

    >>> sorted(result_meta("t1", "SUCCESS", {"label": "a"}))
    ['children', 'date_done', 'result', 'status', 'task_id', 'traceback']
    """
    return {
        "status": state,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": datetime.now(UTC).isoformat(),
        "task_id": task_id,
    }
