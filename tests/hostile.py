"""A catalogue of hostile and malformed inputs, each with the outcome imgq must give it (issue 7).

Every entry is one message a producer could put in the queue, and the one outcome its task must
end in: ``SUCCESS``, ``FAILURE`` with an ``InvalidImage`` / ``InvalidTask`` reason code, or
``DEAD_LETTER`` for bytes that carry no readable task id (nobody can be answered, so the raw
message goes to ``imgq:dead:<queue>``). The worker must stay up through all of them.

=========================  ===========  ======================================================
kind                       outcome      reason
=========================  ===========  ======================================================
empty                      FAILURE      empty
random_bytes               FAILURE      undecodable
text                       FAILURE      undecodable
html                       FAILURE      undecodable
svg                        FAILURE      undecodable
truncated_jpeg             FAILURE      truncated
jpeg_header_only           FAILURE      truncated
truncated_png              FAILURE      truncated
png_bad_crc                FAILURE      corrupt
png_signature_then_junk    FAILURE      corrupt
png_bomb_50000x50000       FAILURE      too_many_pixels
jpeg_bomb_65000x65000      FAILURE      too_many_pixels
over_byte_limit            FAILURE      too_many_bytes
tiff_16bit                 SUCCESS      (decodes by design: scaled to 8 bits)
cmyk_jpeg                  SUCCESS      (decodes by design: converted to RGB)
animated_gif               FAILURE      animated
one_pixel                  FAILURE      too_small
extreme_aspect             FAILURE      bad_aspect
not_base64                 FAILURE      bad_base64
base64_data_uri            FAILURE      bad_base64
base64_with_line_breaks    FAILURE      bad_base64
missing_image              FAILURE      missing_argument
top_k_wrong_type           FAILURE      bad_argument
top_k_out_of_range         FAILURE      bad_argument
image_not_a_string         FAILURE      bad_argument
request_id_object          FAILURE      bad_argument
positional_args            FAILURE      bad_argument
unknown_keyword            FAILURE      unknown_argument
pickle                     FAILURE      content_refused (never unpickled)
wrong_task_name            FAILURE      unknown_task
body_not_json              FAILURE      malformed_message
args_not_a_list            FAILURE      malformed_message
kwargs_not_an_object       FAILURE      malformed_message
expires_overflows          FAILURE      malformed_message
deeply_nested_body         FAILURE      malformed_message
non_json_message           DEAD_LETTER  malformed_message
json_not_an_envelope       DEAD_LETTER  malformed_message
envelope_without_id        DEAD_LETTER  malformed_message
deeply_nested_message      DEAD_LETTER  malformed_message
=========================  ===========  ======================================================

The table is :func:`catalogue`; ``tests/test_hostile.py`` checks the module's docstring against it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import cv2
import numpy as np
import redis
from celery import Celery
from PIL import Image

from imgq.shared.decode import DEFAULT_LIMITS
from imgq.shared.errors import IMAGE_REASONS
from imgq.worker.wire import TASK_NAME
from tests.test_messages import _Trap
from tests.tinymodel import COLOURS, colour_image, encode_png

__all__ = ["Hostile", "catalogue", "envelope", "enqueue", "image_payloads", "b64"]

SUCCESS, FAILURE, DEAD_LETTER = "SUCCESS", "FAILURE", "DEAD_LETTER"
#: 200 kB of nested JSON lists: deeper than Python's recursion limit when parsed.
_NESTED = b"[" * 100_000 + b"]" * 100_000


@dataclasses.dataclass(frozen=True)
class Hostile:
    """One hostile input and the outcome its task must get.

    Attributes:
        name: The kind, e.g. ``"png_bomb_50000x50000"``.
        outcome: ``SUCCESS``, ``FAILURE`` or ``DEAD_LETTER``.
        reason: The reason code of the failure (``""`` for SUCCESS).
        kwargs: Keyword arguments of a JSON task sent with Celery's ``send_task``; or None.
        args: Positional arguments of that task.
        raw: A message pushed into the queue list as it is (a hand-made envelope or junk), when
            ``kwargs`` is None.
        task_id: The task id inside ``raw``, when it has one.
    """

    name: str
    outcome: str
    reason: str
    kwargs: dict[str, Any] | None = None
    args: tuple[Any, ...] = ()
    raw: bytes | None = None
    task_id: str | None = None

    @property
    def error(self) -> str:
        """The exception name a FAILURE carries (``InvalidImage`` or ``InvalidTask``)."""
        return "InvalidImage" if self.reason in IMAGE_REASONS else "InvalidTask"


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``, as the task's ``image`` argument carries it."""
    return base64.b64encode(data).decode()


def good_png(seed: int = 0) -> bytes:
    """A small image the tiny model classifies as class ``seed % 3`` (``"abc"[seed % 3]``)."""
    return encode_png(colour_image(COLOURS[seed % 3], size_px=20 + seed % 7, seed=seed))


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(side_px: int) -> bytes:
    """A valid-looking RGB PNG whose header claims ``side_px`` x ``side_px`` (a few hundred bytes;
    decoding it would need ``3 * side_px**2`` bytes)."""
    ihdr = struct.pack(">IIBBBBB", side_px, side_px, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_bomb(side_px: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim ``side_px`` x ``side_px``."""
    data = bytearray(_jpeg(colour_image(COLOURS[0], size_px=16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side_px, side_px)
    return bytes(data)


def _png_bad_crc() -> bytes:
    """A PNG whose IDAT payload has one byte flipped, so the chunk's CRC no longer matches."""
    data = bytearray(good_png(1))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF
    return bytes(data)


def _tiff_16bit() -> bytes:
    rgb16 = colour_image(COLOURS[2], size_px=24).astype(np.uint16) * 257
    ok, data = cv2.imencode(".tiff", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def _pillow(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _cmyk_jpeg() -> bytes:
    return _pillow(Image.fromarray(colour_image(COLOURS[1], size_px=24)).convert("CMYK"), "JPEG")


def _animated_gif() -> bytes:
    frames = [Image.fromarray(colour_image(c, size_px=24)) for c in COLOURS]
    return _pillow(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def image_payloads() -> dict[str, tuple[str, str, str]]:
    """The catalogue's image kinds: name -> (``image`` argument, outcome, reason)."""
    jpeg = _jpeg(colour_image(COLOURS[0], size_px=64))
    png = good_png(0)
    over_limit = b"\xff\xd8\xff" + bytes(DEFAULT_LIMITS.max_bytes)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>'
    fail = {
        "empty": (b"", "empty"),
        "random_bytes": (np.random.default_rng(7).bytes(4096), "undecodable"),
        "text": (b"hello, this is not an image\n" * 20, "undecodable"),
        "html": (
            b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
            "undecodable",
        ),
        "svg": (svg, "undecodable"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "jpeg_header_only": (jpeg[:200], "truncated"),
        "truncated_png": (png[: len(png) // 2], "truncated"),
        "png_bad_crc": (_png_bad_crc(), "corrupt"),
        "png_signature_then_junk": (
            png[:8] + b"\x13\x37" * 100 + _png_chunk(b"IEND", b""),
            "corrupt",
        ),
        "png_bomb_50000x50000": (_png_bomb(50_000), "too_many_pixels"),
        "jpeg_bomb_65000x65000": (_jpeg_bomb(65_000), "too_many_pixels"),
        "over_byte_limit": (over_limit, "too_many_bytes"),
        "animated_gif": (_animated_gif(), "animated"),
        "one_pixel": (encode_png(colour_image(COLOURS[0], size_px=1)), "too_small"),
        "extreme_aspect": (encode_png(np.zeros((10, 400, 3), np.uint8)), "bad_aspect"),
    }
    payloads = {name: (b64(data), FAILURE, reason) for name, (data, reason) in fail.items()}
    payloads["tiff_16bit"] = (b64(_tiff_16bit()), SUCCESS, "")
    payloads["cmyk_jpeg"] = (b64(_cmyk_jpeg()), SUCCESS, "")
    payloads["not_base64"] = ("this is *not* base64!", FAILURE, "bad_base64")
    payloads["base64_data_uri"] = ("data:image/png;base64," + b64(png), FAILURE, "bad_base64")
    wrapped = "\n".join(b64(png)[i : i + 76] for i in range(0, len(b64(png)), 76))
    payloads["base64_with_line_breaks"] = (wrapped, FAILURE, "bad_base64")
    return payloads


def envelope(
    task_id: str,
    body: bytes,
    *,
    content_type: str = "application/json",
    task: str = TASK_NAME,
    **headers: Any,
) -> bytes:
    """A message as kombu's Redis transport stores it (see ``worker/messages.py``), made by hand
    the way a hostile producer in any language could make it.

    Args:
        task_id: The ``id`` header.
        body: The body bytes (JSON ``[args, kwargs, embed]`` for a well-formed task); stored
            base64-encoded as kombu does.
        content_type: The envelope's content type.
        task: The ``task`` header.
        **headers: More headers (e.g. ``expires``).
    """
    return json.dumps(
        {
            "body": b64(body),
            "content-encoding": "utf-8" if content_type == "application/json" else "binary",
            "content-type": content_type,
            "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, **headers},
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "imgq"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid4()),
            },
        }
    ).encode()


def json_body(args: Any, kwargs: Any) -> bytes:
    """A protocol 2 body: JSON ``[args, kwargs, embed]``."""
    return json.dumps([args, kwargs, {"callbacks": None, "errbacks": None}]).encode()


def catalogue(trap_path: Path) -> list[Hostile]:
    """Every hostile kind with its expected outcome (the table in this module's docstring).

    Args:
        trap_path: The pickled message's payload creates this file if it is ever unpickled.
    """
    good = b64(good_png(0))
    cases = [
        Hostile(name, outcome, reason, kwargs={"image": image})
        for name, (image, outcome, reason) in image_payloads().items()
    ]
    cases += [
        Hostile("missing_image", FAILURE, "missing_argument", kwargs={"top_k": 1}),
        Hostile("top_k_wrong_type", FAILURE, "bad_argument", kwargs={"image": good, "top_k": "3"}),
        Hostile("top_k_out_of_range", FAILURE, "bad_argument", kwargs={"image": good, "top_k": 99}),
        Hostile("image_not_a_string", FAILURE, "bad_argument", kwargs={"image": [1, 2, 3]}),
        Hostile(
            "request_id_object",
            FAILURE,
            "bad_argument",
            kwargs={"image": good, "request_id": {"$gt": ""}},
        ),
        Hostile("positional_args", FAILURE, "bad_argument", kwargs={}, args=(good,)),
        Hostile(
            "unknown_keyword",
            FAILURE,
            "unknown_argument",
            kwargs={"image": good, "callback_url": "http://evil.example/"},
        ),
    ]
    with_id: list[tuple[str, str, Callable[[str], bytes]]] = [
        ("pickle", "content_refused", lambda i: envelope(
            i, pickle.dumps(((), {"image": _Trap(trap_path)}, {})),
            content_type="application/x-python-serialize")),
        ("wrong_task_name", "unknown_task",
         lambda i: envelope(i, json_body([], {"image": good}), task="celery.backend_cleanup")),
        ("body_not_json", "malformed_message", lambda i: envelope(i, b"{not json")),
        ("args_not_a_list", "malformed_message", lambda i: envelope(i, json_body(5, {}))),
        ("kwargs_not_an_object", "malformed_message",
         lambda i: envelope(i, json_body([], "image"))),
        ("expires_overflows", "malformed_message",
         lambda i: envelope(i, json_body([], {"image": good}), expires=10**400)),
        ("deeply_nested_body", "malformed_message",
         lambda i: envelope(i, b'[[], {"image": ' + _NESTED + b"}, {}]")),
    ]  # fmt: skip
    for name, reason, make in with_id:
        task_id = f"hostile-{name}-{uuid4()}"
        cases.append(Hostile(name, FAILURE, reason, raw=make(task_id), task_id=task_id))
    no_id = {
        "non_json_message": b"\x00\xff GARBAGE \x80\x04 not json",
        "json_not_an_envelope": b"[1, 2, 3]",
        "envelope_without_id": json.dumps({"headers": {"task": TASK_NAME}, "body": ""}).encode(),
        "deeply_nested_message": _NESTED,
    }
    cases += [Hostile(n, DEAD_LETTER, "malformed_message", raw=raw) for n, raw in no_id.items()]
    return cases


def enqueue(case: Hostile, app: Celery, r: redis.Redis, queue: str = "imgq") -> str | None:
    """Put ``case`` into ``queue``: a JSON task via Celery's ``send_task``, or the raw bytes via
    ``LPUSH``. Returns the task id, or None for a message without one."""
    if case.kwargs is not None:
        return str(app.send_task(TASK_NAME, args=case.args, kwargs=case.kwargs, queue=queue).id)
    assert case.raw is not None
    r.lpush(queue, case.raw)
    return case.task_id
