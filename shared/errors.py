"""The errors imgq raises on purpose, in one small tree.

    ImgqError                      base of everything below
    ├── InvalidImage(reason, detail)   one image cannot be served; fails only its own task
    ├── InvalidTask(reason, detail)    the task's arguments or message are unusable
    ├── ManifestError                  a model bundle's manifest is missing, invalid or mismatching
    ├── BundleError                    bundle files disagree with the manifest (hash, shape, golden)
    └── ParityError                    the exported model does not reproduce the trained one

``InvalidImage`` and ``InvalidTask`` carry a machine-readable ``reason`` code; their message starts
with it (``"undecodable: not a JPEG, PNG, ..."``) so a caller in any language can branch on the text
of a Celery FAILURE result without importing imgq.
"""

from __future__ import annotations

__all__ = [
    "ImgqError",
    "InvalidImage",
    "InvalidTask",
    "ManifestError",
    "BundleError",
    "ParityError",
    "IMAGE_REASONS",
    "TASK_REASONS",
]

#: Reason codes of :class:`InvalidImage`, each with what it means.
IMAGE_REASONS: dict[str, str] = {
    "empty": "the payload has zero bytes",
    "too_many_bytes": "the payload is larger than the byte limit",
    "bad_base64": "the `image` argument is not valid base64",
    "undecodable": "the bytes are not an image in a supported format",
    "truncated": "the image data ends early",
    "corrupt": "the image data is damaged (bad checksum or stream)",
    "too_many_pixels": "width x height exceeds the pixel limit (decompression bomb guard)",
    "too_small": "a side is shorter than the minimum",
    "bad_aspect": "the aspect ratio is beyond the limit",
    "animated": "an animation has several frames; send one frame",
    "unsupported": "a format or pixel layout imgq does not serve",
}

#: Reason codes of :class:`InvalidTask`.
TASK_REASONS: dict[str, str] = {
    "missing_argument": "a required keyword argument is absent",
    "bad_argument": "an argument has the wrong type or value",
    "unknown_argument": "an unexpected keyword argument was sent",
    "content_refused": "the body is not plain JSON (pickle, YAML, compressed); only JSON is read",
    "malformed_message": "the message body cannot be parsed as a Celery protocol 2 task",
    "message_too_large": "the message is longer than any valid task can be; it was not read",
    "redelivered_too_often": (
        "the message was handed out IMGQ_MAX_DELIVERIES times and never answered (its workers "
        "died or hung on it): a poison pill, kept in the dead letters"
    ),
    "internal_error": "a bug in the worker refused the task; it is kept in the dead letters",
    "unsupported": "a Celery option or message format imgq does not honour (the detail names it)",
    "unknown_task": "the task name is not one this queue's workers serve",
}


class ImgqError(Exception):
    """Base class of every error imgq raises on purpose."""


class _ReasonError(ImgqError):
    """An error with a reason code that leads its message."""

    reasons: dict[str, str] = {}

    def __init__(self, reason: str, detail: str = "") -> None:
        if not detail and reason not in self.reasons:
            # Celery's client rebuilds a stored failure as cls(message): take "reason: detail".
            reason, _, detail = reason.partition(": ")
        if reason not in self.reasons:
            raise ValueError(
                f"unknown {type(self).__name__} reason {reason!r}; "
                f"use one of {', '.join(sorted(self.reasons))}"
            )
        self.reason = reason
        self.detail = detail or self.reasons[reason]
        super().__init__(f"{reason}: {self.detail}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Keep (reason, detail) across copy/pickle instead of the formatted message.
        return (type(self), (self.reason, self.detail))


class InvalidImage(_ReasonError):
    """One image cannot be decoded or is outside the limits; only its own task fails.

    >>> str(InvalidImage("empty", "0 bytes received"))
    'empty: 0 bytes received'
    >>> InvalidImage("empty").reason
    'empty'
    """

    reasons = IMAGE_REASONS


class InvalidTask(_ReasonError):
    """The task message or its arguments are unusable (not the image itself).

    >>> str(InvalidTask("missing_argument", "`image` is required"))
    'missing_argument: `image` is required'
    """

    reasons = TASK_REASONS


class ManifestError(ImgqError):
    """A manifest is missing, fails validation, or does not match its bundle."""


class BundleError(ImgqError):
    """A bundle's files disagree with its manifest: model hash, input shape or golden set."""


class ParityError(ImgqError):
    """The exported model's answers differ from the trained model's on the same files."""
