"""Reading a task's canvas: what Celery's worker does after the task (callbacks, errbacks, the
rest of a chain, a chord's part), as a protocol 2 message carries it.

The body's third element, the *embed*, holds the signatures
(``{"callbacks": [...], "errbacks": [...], "chain": [...], "chord": {...}}``, each null when
unused) and the headers ``group``, ``group_index``, ``root_id`` and ``parent_id`` say where the
task sits. Nearly every imgq task has an all-null embed: :func:`parse_canvas` then returns None
without reading a header, so the common case costs one dict lookup per field.

Every byte is hostile: a field of the wrong type fails the task (``malformed_message``, the
field named) instead of meeting Celery's canvas code later, in the engine thread. The
signatures are only checked for shape here; Celery builds them when the follow-ups are sent
(``worker/celeryapp/followups.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from imgq.shared.errors import InvalidTask

__all__ = ["MAX_SIGNATURES", "Canvas", "parse_canvas"]

#: Most signatures one task may carry, counting those nested in others (a callback's own
#: ``link``, a chord body's chain...): a real task has a handful. Each may become a message,
#: and nested ones become messages later, so counting them all bounds what one hostile message
#: makes the whole fleet send, not only this worker.
MAX_SIGNATURES = 100
#: Longest task name, group id, root or parent id accepted (Celery's ids are 36 characters).
_MAX_ID_CHARS = 512
_EMBED_FIELDS = ("callbacks", "errbacks", "chain", "chord")
_SIGNATURE_FIELDS = (
    ("args", list, "a list"),
    ("kwargs", dict, "an object"),
    ("options", dict, "an object"),
    ("subtask_type", str, "a string"),
)


@dataclasses.dataclass(frozen=True)
class Canvas:
    """What to do after one task, as its message said.

    Attributes:
        callbacks: ``link`` signatures (dicts as Celery serialised them), applied with the result.
        errbacks: ``link_error`` signatures, applied when the task fails.
        chain: The rest of a chain, last element next (Celery's order).
        chord: The chord's body when the task is a part of a chord's header, else None.
        group: The ``group`` header: the chord's group id.
        group_index: The task's place in its group (orders the chord's results).
        root_id: The ``root_id`` header: the first task of the workflow.
        parent_id: The ``parent_id`` header.
        priority: The message's ``priority`` property (Celery passes it on only when
            ``task_inherit_parent_priority`` is set).
    """

    callbacks: tuple[dict[str, Any], ...] = ()
    errbacks: tuple[dict[str, Any], ...] = ()
    chain: tuple[dict[str, Any], ...] = ()
    chord: dict[str, Any] | None = None
    group: str | None = None
    group_index: int | None = None
    root_id: str | None = None
    parent_id: str | None = None
    priority: int | None = None


def parse_canvas(embed: Any, headers: dict[str, Any], properties: dict[str, Any]) -> Canvas | None:
    """The canvas of a protocol 2 message, or None when it asks for nothing after the task.

    Args:
        embed: The body's third element.
        headers: The envelope's headers.
        properties: The envelope's properties.

    Raises:
        InvalidTask: ``malformed_message`` naming the field that has the wrong type or size.

    >>> parse_canvas({"callbacks": None, "errbacks": None, "chain": None, "chord": None}, {}, {})
    >>> parse_canvas({"callbacks": [{"task": "user.store"}]}, {"root_id": "r"}, {}).root_id
    'r'
    >>> parse_canvas({"chord": [1]}, {}, {})
    Traceback (most recent call last):
    ...
    imgq.shared.errors.InvalidTask: malformed_message: the embed's `chord` must be a signature ...
    """
    if embed is None:
        return None
    if not isinstance(embed, dict):
        raise _bad(f"the body's embed must be an object or null, got {embed!r:.80}")
    if not any(embed.get(name) for name in _EMBED_FIELDS):
        return None
    callbacks = _signatures(embed, "callbacks")
    errbacks = _signatures(embed, "errbacks")
    chain = _signatures(embed, "chain")
    chord = embed.get("chord")
    if chord is not None:
        _check_signature(chord, "the embed's `chord`")
    count = _nested_signatures(embed)
    if count > MAX_SIGNATURES:
        raise _bad(f"the embed holds {count} signatures, over the {MAX_SIGNATURES} accepted")
    group_index = headers.get("group_index")
    if group_index is not None and (
        not isinstance(group_index, int) or isinstance(group_index, bool) or group_index < 0
    ):
        raise _bad(f"the `group_index` header must be an integer >= 0, got {group_index!r:.80}")
    priority = properties.get("priority")
    if not (isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255):
        priority = None  # read only for task_inherit_parent_priority; Celery's default ignores it
    return Canvas(
        callbacks=callbacks,
        errbacks=errbacks,
        chain=chain,
        chord=chord,
        group=_id_header(headers, "group"),
        group_index=group_index,
        root_id=_id_header(headers, "root_id"),
        parent_id=_id_header(headers, "parent_id"),
        priority=priority,
    )


def _nested_signatures(embed: dict[str, Any]) -> int:
    """Signatures anywhere in the embed (objects with a ``task``), counted without recursion
    (the message parser bounds how many containers there are, not how deep they nest)."""
    count, stack = 0, [embed]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            count += "task" in value
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


def _signatures(embed: dict[str, Any], name: str) -> tuple[dict[str, Any], ...]:
    """The embed's list of signatures ``name`` (empty when null)."""
    value = embed.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad(f"the embed's `{name}` must be a list of signatures or null, got {value!r:.80}")
    if len(value) > MAX_SIGNATURES:
        raise _bad(f"the embed's `{name}` holds {len(value)} signatures, over {MAX_SIGNATURES}")
    for i, sig in enumerate(value):
        _check_signature(sig, f"the embed's `{name}[{i}]`")
    return tuple(value)


def _check_signature(sig: Any, where: str) -> None:
    """A signature as Celery serialises one: ``task`` a name, ``args`` a list, ``kwargs`` and
    ``options`` objects, ``subtask_type`` a string or null."""
    if not isinstance(sig, dict):
        raise _bad(f"{where} must be a signature (an object), got {sig!r:.80}")
    task = sig.get("task")
    if not isinstance(task, str) or not 0 < len(task) <= _MAX_ID_CHARS:
        raise _bad(f"{where} must name its task (`task`, a string), got {task!r:.80}")
    for key, kind, label in _SIGNATURE_FIELDS:
        value = sig.get(key)
        if value is not None and not isinstance(value, kind):
            raise _bad(f"{where}'s `{key}` must be {label} or null, got {value!r:.80}")


def _id_header(headers: dict[str, Any], name: str) -> str | None:
    """An id header (``group``, ``root_id``, ``parent_id``): a string or null."""
    value = headers.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID_CHARS:
        raise _bad(f"the `{name}` header must be an id (a string) or null, got {value!r:.80}")
    return value


def _bad(detail: str) -> InvalidTask:
    return InvalidTask("malformed_message", detail)
