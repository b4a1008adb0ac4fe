"""Model bundles published to the fleet through Redis: a worker on a new machine needs nothing
but the Redis URL.

``imgq models publish BUNDLE_DIR`` stores what serving reads of a bundle (the manifest, the ONNX
file it names, its golden set) under the bundle's sha256: the hash of every file's path and
sha256, so the same model with another preprocessing or other labels is another version. Its
version id is the first 12 hex digits. A worker started without ``--model`` fetches the version
it is given (``--model-version`` / ``IMGQ_MODEL_VERSION``) or its queue's stable one, once:
each file is checked against its sha256, the whole against the version, into a local cache
(``IMGQ_MODEL_CACHE``) that later starts reuse after checking it again. Then the bundle's own
checks run as for a folder (model hash, signature, golden set on this worker's provider).

Keys::

    imgq:bundles                 hash: bundle sha256 -> JSON metadata (name, files, bytes, ...)
    imgq:bundle:<sha256>         hash: file path -> bytes
    imgq:stable:<queue>          the sha256 a queue's workers serve when given no version

A bundle is capped at ``IMGQ_BUNDLE_MAX_BYTES`` (256 MiB): Redis holds it in memory and sends
it whole to each fetching worker. A larger model is served from a folder every machine mounts
(``--model DIR``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from imgq.shared.bundle import ModelBundle, bundle_file, bundle_sha256, serving_files
from imgq.shared.errors import BundleError, ImgqError
from imgq.shared.manifest import MANIFEST_FILE, Manifest, load_manifest

__all__ = [
    "BUNDLES_KEY",
    "BundleVersion",
    "PublishError",
    "bundle_files",
    "drift_ids",
    "delete",
    "fetch",
    "list_versions",
    "publish",
    "resolve",
    "stable_key",
]

BUNDLES_KEY = "imgq:bundles"
_VERSION_CHARS = 12
_SHA256 = re.compile("[0-9a-f]{64}")
_LATEST_EPOCH_S = 253_402_300_799  # the end of year 9999: a time every tool can print
#: A staging or moved-aside folder older than this was left by a worker killed meanwhile.
_STALE_S = 3600


class PublishError(ImgqError):
    """A bundle cannot be published or fetched; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class BundleVersion:
    """One published bundle.

    Attributes:
        sha256: The bundle's hash (every file's path and sha256).
        name: The model's name from its manifest.
        model_sha256: The ONNX file's sha256 (what results carry as ``model.sha256``).
        files: Path -> sha256 of each stored file.
        size: Bytes stored.
        published_at: Epoch seconds.
    """

    sha256: str
    name: str
    model_sha256: str
    files: dict[str, str]
    size: int
    published_at: float

    @property
    def version(self) -> str:
        """The short id people type: the first 12 hex digits of :attr:`sha256`."""
        return self.sha256[:_VERSION_CHARS]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> BundleVersion:
        """Raises:
        ValueError: not a version's JSON (an entry in Redis is hostile input)."""
        data = json.loads(raw)
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != set(fields):
            raise ValueError("not a bundle version")
        files, size, when = data["files"], data["size"], data["published_at"]
        if not (
            all(isinstance(data[k], str) for k in ("sha256", "name", "model_sha256"))
            and isinstance(files, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
            and type(size) is int and size >= 0
            and isinstance(when, int | float) and not isinstance(when, bool)
            and 0 <= when <= _LATEST_EPOCH_S
        ):  # fmt: skip
            raise ValueError("not a bundle version")
        return cls(**data)


def stable_key(queue: str) -> str:
    """The key holding the sha256 of the version ``queue``'s workers serve by default."""
    return f"imgq:stable:{queue}"


def bundle_files(directory: Path) -> dict[str, Path]:
    """What serving reads of a bundle: the manifest, the model file it names, the golden set.

    Raises:
        ManifestError: the manifest is missing or invalid.
        PublishError: a file it names is missing.
    """
    root = Path(directory).resolve()
    files = {}
    for name in serving_files(load_manifest(directory)):
        path = Path(directory) / name
        if not path.is_file():
            raise PublishError(f"{path}, named by the bundle's manifest, does not exist")
        if not path.resolve().is_relative_to(root):
            raise PublishError(f"{path} leads outside the bundle folder (a symbolic link)")
        files[name] = path
    return files


def _check_name(name: str) -> None:
    """A stored file name is written as it is named, inside the bundle's folder."""
    try:
        if bundle_file(name) == name:
            return
    except BundleError:
        pass
    raise PublishError(f"a bundle file must be a normalised path inside it, got {name!r:.80}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(
    client: redis.Redis,
    directory: Path,
    max_bytes: int,
    queue: str,
    make_stable: bool = False,
    *,
    check: bool = True,
) -> tuple[BundleVersion, bool]:
    """Store a bundle (idempotent: the same files are the same version).

    Args:
        client: The broker's Redis.
        directory: The bundle folder written by ``imgq train``.
        max_bytes: Largest bundle accepted.
        queue: The queue whose stable version it becomes when it has none (or ``make_stable``).
        make_stable: Make it the queue's stable version even if there is one.
        check: Run a worker's start-up checks first. Workers run them again on their own
            execution provider in any case; False stores a bundle checked elsewhere.

    Returns:
        The version, and whether it is now the queue's stable version.

    Raises:
        PublishError: over ``max_bytes``, or a file the manifest names is missing.
    """
    files = bundle_files(Path(directory))
    size = sum(path.stat().st_size for path in files.values())
    if size > max_bytes:
        raise PublishError(
            f"the bundle holds {size} bytes, over IMGQ_BUNDLE_MAX_BYTES={max_bytes}: Redis keeps "
            "it in memory and sends it to every worker that fetches it; raise the limit, or serve "
            "the bundle from a folder every machine mounts (`imgq worker --model DIR`)"
        )
    # The checks a worker runs at start (model hash, signature, golden set), before any worker
    # can be pointed at it.
    if check:
        ModelBundle.load(Path(directory), device="cpu")
    contents = {name: path.read_bytes() for name, path in files.items()}
    shas = {name: _sha256(data) for name, data in contents.items()}
    manifest = load_manifest(Path(directory))
    version = BundleVersion(
        sha256=bundle_sha256(shas),
        name=manifest.name,
        model_sha256=manifest.model_sha256,
        files=shas,
        size=size,
        published_at=time.time(),
    )
    existing = client.hget(BUNDLES_KEY, version.sha256)
    with contextlib.suppress(ValueError, TypeError):
        if existing is not None:  # the same version again: keep when it was first published
            version = dataclasses.replace(
                version, published_at=BundleVersion.from_json(existing).published_at
            )
    # The contents are stored again every time: publishing repairs a damaged stored copy.
    pipe = client.pipeline(transaction=True)
    pipe.delete(f"imgq:bundle:{version.sha256}")
    pipe.hset(f"imgq:bundle:{version.sha256}", mapping=contents)  # type: ignore[arg-type]
    pipe.hset(BUNDLES_KEY, version.sha256, version.to_json())
    pipe.execute()
    if make_stable:
        client.set(stable_key(queue), version.sha256)
        return version, True
    stable = client.set(stable_key(queue), version.sha256, nx=True)
    return version, bool(stable) or client.get(stable_key(queue)) == version.sha256.encode()


def delete(client: redis.Redis, version: BundleVersion) -> None:
    """Remove a published version from Redis (workers that fetched it keep their copy).

    Raises:
        PublishError: it is some queue's stable version.
    """
    for key in client.scan_iter(match="imgq:stable:*", count=1000):
        if _text(client.get(key)) == version.sha256:
            queue = _text(key).removeprefix("imgq:stable:")
            raise PublishError(
                f"version {version.version} is the stable version of queue {queue!r}: make "
                "another one stable first (`imgq models publish DIR --stable`)"
            )
    pipe = client.pipeline(transaction=True)
    pipe.hdel(BUNDLES_KEY, version.sha256)
    pipe.delete(f"imgq:bundle:{version.sha256}")
    pipe.execute()


def list_versions(client: redis.Redis) -> list[BundleVersion]:
    """Every published version, newest first (an entry that is not one is skipped)."""
    versions = []
    for raw in client.hvals(BUNDLES_KEY):
        try:
            version = BundleVersion.from_json(raw)
            if not _SHA256.fullmatch(version.sha256):
                continue
            for name in version.files:
                _check_name(name)
        except (ValueError, TypeError, AttributeError, PublishError):
            continue
        versions.append(version)
    return sorted(versions, key=lambda v: v.published_at, reverse=True)


def resolve(client: redis.Redis, version: str | None, queue: str) -> BundleVersion:
    """The published version named by ``version`` (a prefix of its sha256 of at least 6 hex
    digits), or the queue's stable one when ``version`` is None.

    Raises:
        PublishError: nothing matches, several versions do, or the queue has no stable version.
    """
    if version is None:
        stable = client.get(stable_key(queue))
        if stable is None:
            raise PublishError(
                f"queue {queue!r} has no stable model version: publish one with `imgq models "
                "publish BUNDLE_DIR`, or give a bundle folder (--model DIR or IMGQ_MODEL)"
            )
        version = _text(stable)
    wanted = version.strip().lower()
    if len(wanted) < 6 or any(c not in "0123456789abcdef" for c in wanted):
        raise PublishError(f"a model version is 6 to 64 hex digits, got {version!r:.80}")
    matches = [v for v in list_versions(client) if v.sha256.startswith(wanted)]
    if len(matches) != 1:
        found = "no published version" if not matches else f"{len(matches)} versions"
        raise PublishError(f"{found} matches {version!r}; `imgq models list` shows them")
    return matches[0]


def fetch(client: redis.Redis, version: BundleVersion, cache_dir: Path, max_bytes: int) -> Path:
    """The bundle's folder in ``cache_dir``: reused when its files still match, else fetched
    from Redis, checked file by file and as a whole, and moved into place in one rename.

    Raises:
        PublishError: a stored file is missing, over ``max_bytes`` in all, or does not match
            its sha256.
    """
    if version.size > max_bytes:
        raise PublishError(
            f"version {version.version} holds {version.size} bytes, over "
            f"IMGQ_BUNDLE_MAX_BYTES={max_bytes}"
        )
    target = Path(cache_dir) / version.sha256
    if target.is_dir() and _matches(target, version):
        return target
    key = f"imgq:bundle:{version.sha256}"
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    _sweep(Path(cache_dir))
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_dir))
    try:
        shas = {}
        lengths = [int(client.hstrlen(key, name)) for name in version.files]
        if sum(lengths) > max_bytes:
            raise PublishError(f"version {version.version} holds more than its {max_bytes} bytes")
        for name, expected in version.files.items():
            data = _raw(client.hget(key, name))
            if data is None:
                raise PublishError(f"version {version.version} lacks {name} in Redis ({key})")
            shas[name] = _sha256(data)
            if shas[name] != expected:
                raise PublishError(
                    f"{name} of version {version.version} has sha256 {shas[name]} in Redis, "
                    f"not {expected}: the stored bundle was changed or damaged; publish it again"
                )
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if bundle_sha256(shas) != version.sha256:
            raise PublishError(f"the files of version {version.version} do not make its sha256")
        return _place(staging, target, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _place(staging: Path, target: Path, version: BundleVersion) -> Path:
    """Move a checked staging folder to ``target``. Workers sharing a cache may fetch at once:
    a target another one put in place meanwhile is used if it matches; a damaged one is moved
    aside first (never deleted in place under a reader)."""
    for _ in range(3):
        if target.is_dir() and _matches(target, version):
            return target
        if target.exists() or target.is_symlink():
            aside = target.with_name(f".old-{target.name}-{os.getpid()}-{time.monotonic_ns()}")
            with contextlib.suppress(OSError):
                os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
            with contextlib.suppress(OSError):
                aside.unlink()
        try:
            os.replace(staging, target)
            return target
        except OSError:
            continue  # another worker placed it first: check theirs
    raise PublishError(f"could not place version {version.version} in {target.parent}")


def _raw(reply: object) -> bytes | None:
    """A reply of a client that does not decode responses, typed."""
    return reply if isinstance(reply, bytes) or reply is None else str(reply).encode()


def _text(reply: object) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _sweep(cache_dir: Path) -> None:
    """Remove staging and moved-aside folders that workers killed mid-fetch left behind."""
    now = time.time()
    for entry in cache_dir.iterdir():
        if entry.name.startswith((".fetch-", ".old-")):
            with contextlib.suppress(OSError):
                if now - entry.lstat().st_mtime > _STALE_S:
                    shutil.rmtree(entry, ignore_errors=True)


def _matches(folder: Path, version: BundleVersion) -> bool:
    """Whether a cached folder still holds exactly the version's files."""
    try:
        shas = {name: _sha256((folder / name).read_bytes()) for name in version.files}
    except OSError:
        return False
    return shas == version.files


def drift_ids(client: redis.Redis, versions: list[BundleVersion]) -> dict[str, str]:
    """Version sha256 -> the drift id of its stored manifest (``Manifest.drift_id``: where
    its drift state lives), for the versions whose manifest reads as one."""
    pipe = client.pipeline(transaction=False)
    for v in versions:
        pipe.hget(f"imgq:bundle:{v.sha256}", MANIFEST_FILE)
    out = {}
    for v, raw in zip(versions, pipe.execute(), strict=True):
        try:
            out[v.sha256] = Manifest.from_dict(json.loads(raw)).drift_id
        except (ImgqError, ValueError, TypeError, KeyError, AttributeError):
            continue
    return out


def served_by(replies: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Version -> the worker nodes serving it, from ``imgq_status`` replies."""
    out: dict[str, list[str]] = {}
    for reply in replies:
        for node, status in reply.items():
            if isinstance(status, dict) and status.get("loaded"):
                out.setdefault(str(status.get("version", "")), []).append(node)
                if isinstance(status.get("candidate"), str):
                    out.setdefault(status["candidate"], []).append(node)
    return out
