"""Where drift lives in Redis: one model's keys (:class:`DriftKeys`), the slots of a window's
string (:class:`WindowLayout`), and the Lua scripts that add a batch to the open window and
close it.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis

from imgq.shared.imagestats import IMAGE_FEATURES, OUTPUT_FEATURES
from imgq.shared.reference import ReferenceStats

__all__ = [
    "ALL_FEATURES",
    "ALERTS_KEPT",
    "DriftKeys",
    "STATE_TTL_S",
    "SUM_SCALE",
    "THUMBNAILS_KEPT",
    "THUMBNAIL_PX",
    "Window",
    "WindowLayout",
]


#: Every feature a window counts: the image features, then the model-output features.
ALL_FEATURES: tuple[str, ...] = IMAGE_FEATURES + OUTPUT_FEATURES

#: A window's sums are stored as integers: this many per unit (exact to 1e-6 per batch).
SUM_SCALE = 1_000_000
#: Slots of a window's Redis string (see :class:`WindowLayout`).
_N_SLOT, _T0_SLOT, _T1_SLOT, _FIRST_BIN_SLOT = 0, 1, 2, 3

#: Largest side of a stored out-of-range thumbnail, pixels.
THUMBNAIL_PX = 64
#: How many recent out-of-range thumbnails Redis keeps per model.
THUMBNAILS_KEPT = 64
#: Alert stream length kept (approximate trim).
ALERTS_KEPT = 10_000

#: Default lifetime of a model's drift keys after it was last served or reviewed: 30 days.
STATE_TTL_S = 30 * 86_400


@dataclasses.dataclass(frozen=True)
class Window:
    """One closed window: the summed counts of all workers' traffic over its span.

    Attributes:
        id: Window id (from the model's ``seq`` counter).
        n_images: Images counted.
        start_s: Server time (Unix seconds) of its first batch.
        end_s: Server time of its last batch.
        counts: Count per reference bin, per feature present.
        sums: Sum of the values per continuous feature, for the current mean.
        out_of_range: Images with some pixel feature outside the training range.
        calibrated_confidence_sum: Sum of the calibrated top-1 probabilities (0 when the bundle
            has no calibration).
        novel: Images whose novelty is above the bundle's threshold (0 when the bundle has no
            novelty model).
    """

    id: int
    n_images: int
    start_s: float
    end_s: float
    counts: dict[str, np.ndarray]
    sums: dict[str, float]
    out_of_range: int = 0
    calibrated_confidence_sum: float = 0.0
    novel: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Summary for alerts and logs (no counts)."""
        return {
            "id": self.id,
            "n_images": self.n_images,
            "start": _iso(self.start_s),
            "end": _iso(self.end_s),
            "duration_s": round(self.end_s - self.start_s, 3),
        }


class WindowLayout:
    """Where each number of a window lives in its Redis string: signed 64-bit slots, addressed as
    ``BITFIELD key INCRBY i64 #slot`` does.

    Slot 0 is the image count, 1 and 2 the server time (µs) of the first and last batch, then the
    bins of every feature in :data:`ALL_FEATURES` order (those the reference has), then the sums
    of the continuous features in fixed point (:data:`SUM_SCALE` per unit), for the current mean,
    then the count of out-of-range images, the fixed-point sum of calibrated confidences and the
    count of novel images (slots a window written by an older worker lacks read as 0; a slot
    never incremented is not in the string, so a bundle without novelty writes what it did).
    Every worker derives the same layout from the same reference. One ``BITFIELD`` of a batch's
    ~150 increments costs Redis a fraction of what ~150 ``HINCRBY`` on a hash did
    (``docs/benchmarks.md``).

    >>> from imgq.shared.reference import build_reference
    >>> layout = WindowLayout(build_reference(np.arange(40.0)[:, None], ["brightness"], n_bins=4))
    >>> layout.first_bin, layout.sum_slots, layout.out_of_range_slot, layout.novel_slot
    ({'brightness': 3}, {'brightness': 7}, 8, 10)
    >>> raw = np.array([5, 2_000_000, 3_500_000, 1, 0, 4, 0, 2_500_000, 2, 4_000_000], ">i8")
    >>> w = layout.parse(9, raw.tobytes())
    >>> w.n_images, w.start_s, w.end_s, w.counts["brightness"].tolist(), w.sums["brightness"]
    (5, 2.0, 3.5, [1, 0, 4, 0], 2.5)
    >>> w.out_of_range, w.calibrated_confidence_sum, w.novel
    (2, 4.0, 0)
    """

    def __init__(self, reference: ReferenceStats) -> None:
        features = reference.features
        self.names = [n for n in ALL_FEATURES if n in features]
        self.first_bin: dict[str, int] = {}
        slot = _FIRST_BIN_SLOT
        for name in self.names:
            self.first_bin[name] = slot
            slot += len(features[name].counts)
        self.sum_slots: dict[str, int] = {}
        for name in self.names:
            if not features[name].categorical:
                self.sum_slots[name] = slot
                slot += 1
        self.out_of_range_slot = slot
        self.calibrated_confidence_slot = slot + 1
        self.novel_slot = slot + 2
        self.size = slot + 3
        self._n_bins = {name: len(features[name].counts) for name in self.names}

    def parse(self, window_id: int, raw: bytes | None) -> Window:
        """The :class:`Window` stored in ``raw`` (the ``GET`` of a window's key; slots never
        written read as 0, a missing key as an empty window)."""
        values = np.zeros(self.size, np.int64)
        stored = np.frombuffer(raw or b"", ">i8")[: self.size]
        values[: len(stored)] = stored
        counts = {
            name: values[first : first + self._n_bins[name]].copy()
            for name, first in self.first_bin.items()
        }
        sums = {name: float(values[slot]) / SUM_SCALE for name, slot in self.sum_slots.items()}
        return Window(
            id=window_id,
            n_images=int(values[_N_SLOT]),
            start_s=float(values[_T0_SLOT]) / 1e6,
            end_s=float(values[_T1_SLOT]) / 1e6,
            counts=counts,
            sums=sums,
            out_of_range=int(values[self.out_of_range_slot]),
            calibrated_confidence_sum=float(values[self.calibrated_confidence_slot]) / SUM_SCALE,
            novel=int(values[self.novel_slot]),
        )


class DriftKeys:
    """The Redis keys of one model's drift state (one place, shared by workers and review).

    >>> DriftKeys("0123456789ab").window(7)
    'imgq:drift:0123456789ab:window:7'
    """

    def __init__(self, drift_id: str) -> None:
        prefix = f"imgq:drift:{drift_id}:"
        self.prefix = prefix
        # Windows are strings of i64 slots (WindowLayout); older imgq kept hashes under
        # "open" and "win:<id>", hence the new names.
        self.open = prefix + "window"
        self.seq = prefix + "seq"
        self.window_prefix = prefix + "window:"
        self.latest = prefix + "latest"
        self.alerts = prefix + "alerts"
        self.open_alerts = prefix + "open_alerts"
        self.acked = prefix + "acked"
        self.out_of_range = prefix + "out_of_range"
        self.novel = prefix + "novel"
        self.verdicts = prefix + "verdicts"
        self.samples = prefix + "samples"

    @property
    def state(self) -> tuple[str, ...]:
        """Every key that expires ``state_ttl_s`` after the model was last used: all but the
        windows (the open one has its own refresh, closed ones their own TTL)."""
        return (
            self.seq,
            self.latest,
            self.alerts,
            self.open_alerts,
            self.acked,
            self.out_of_range,
            self.verdicts,
            self.samples,
            self.novel,
        )

    def window(self, window_id: int) -> str:
        """Key of closed window ``window_id``."""
        return f"{self.window_prefix}{window_id}"

    def ack(
        self, client: redis.Redis, alert_id: str, when: str, *, ttl_s: int = STATE_TTL_S
    ) -> None:
        """Record that alert ``alert_id`` was acknowledged at ``when``, and refresh the TTL of
        every :attr:`state` key: a review is a use of the model. All of them, not only
        ``acked``: the window id sequence must outlive the acknowledgements, or a window id
        reused after ``seq`` expired would show a new alert as already acknowledged."""
        pipe = client.pipeline()
        pipe.hset(self.acked, alert_id, when)
        for key in self.state:
            pipe.expire(key, ttl_s)
        pipe.execute()


# Adds one batch to the open window (a string of i64 slots, see WindowLayout): the image count,
# then "slot increment ..." pairs (bin counts and fixed-point sums) in one BITFIELD; records the
# server time of the first and last batch (µs); refreshes the window's TTL (a window of a model
# no longer served goes); returns the new image count.
# A Lua function, so that a larger script (one that also stores the batch's results) can include
# it. ttl: seconds; nil or 0 leaves the window's TTL as it was.
_ADD_WINDOW_FUNCTION_LUA = """
local function add_window(key, n, pairs, ttl)
  local head = redis.call('BITFIELD', key, 'INCRBY', 'i64', '#0', n, 'GET', 'i64', '#1')
  local t = redis.call('TIME')
  local now = t[1] .. string.format('%06d', t[2])
  local ops = {'SET', 'i64', '#2', now}
  if head[2] == 0 then
    ops[#ops + 1] = 'SET'; ops[#ops + 1] = 'i64'; ops[#ops + 1] = '#1'; ops[#ops + 1] = now
  end
  for slot, inc in string.gmatch(pairs, '(%d+) (%-?%d+)') do
    ops[#ops + 1] = 'INCRBY'; ops[#ops + 1] = 'i64'; ops[#ops + 1] = '#' .. slot
    ops[#ops + 1] = inc
  end
  redis.call('BITFIELD', key, unpack(ops))
  if ttl and tonumber(ttl) > 0 then redis.call('EXPIRE', key, ttl) end
  return head[1]
end
"""
# KEYS: the open window. ARGV: images in the batch, "slot increment ..." pairs, and (optional)
# the window's TTL in seconds.
_ADD_LUA = _ADD_WINDOW_FUNCTION_LUA + "return add_window(KEYS[1], ARGV[1], ARGV[2], ARGV[3])\n"

# Closes the open window if it is still full (and, for the time closer, old enough): the RENAME
# is atomic, so when several workers see the window full at once exactly one closes it; batches
# that arrive after it start a new open window. With ARGV[5] = 1 (the time closer), an old window
# with fewer images than ARGV[1] is deleted instead (too few to judge; the next starts fresh).
# Either way the model is in use: every state key's TTL is refreshed.
# KEYS: the open window, seq, then the other state keys. ARGV: min images, min age (s), closed
# window key prefix, closed window TTL (s), drop smaller (0/1), state TTL (s).
# Returns {id, images}: id > 0 closed as that window, 0 nothing closed, -1 dropped unjudged.
_CLOSE_LUA = """
local head = redis.call('BITFIELD', KEYS[1], 'GET', 'i64', '#0', 'GET', 'i64', '#1')
local n, drop = head[1], ARGV[5] == '1'
if n < tonumber(ARGV[1]) and not (drop and head[2] > 0) then return {0, n} end
local min_age = tonumber(ARGV[2])
if min_age > 0 then
  local t = redis.call('TIME')
  local age_s = tonumber(t[1]) + tonumber(t[2]) / 1e6 - head[2] / 1e6
  if age_s < min_age then return {0, n} end
end
local id = -1
if n < tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
else
  id = redis.call('INCR', KEYS[2])
  local closed = ARGV[3] .. id
  redis.call('RENAME', KEYS[1], closed)
  redis.call('EXPIRE', closed, ARGV[4])
end
for i = 2, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
return {id, n}
"""


def _iso(t_s: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(t_s, UTC).isoformat(timespec="milliseconds")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _check_ttl(name: str, ttl_s: int) -> None:
    """Redis EXPIRE takes whole seconds > 0."""
    if not isinstance(ttl_s, int) or ttl_s < 1:
        raise ValueError(f"{name} must be an integer >= 1 (seconds), got {ttl_s!r}")
