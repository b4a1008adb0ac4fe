"""Load a model bundle for serving: manifest, model hash, onnxruntime session, golden-set check.

A worker trusts nothing about a bundle it did not check itself: the model file must hash to the
manifest's sha256, the ONNX input must be the tensor the manifest's preprocessing makes, and the
bundle's golden images, decoded and preprocessed by ``shared/`` and run on *this process's*
execution provider, must give the probabilities Keras gave them at export. Any mismatch is a
:class:`~shared.errors.BundleError` that says what differs and how to fix it.

No TensorFlow here: this module is the whole of what a worker needs to run a model, and what
the trainer's export uses to check the served path (so neither package imports the other).
"""

from __future__ import annotations

import functools
import hashlib
import statistics
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnxruntime as ort

from imgq.shared.decode import decode_image
from imgq.shared.errors import BundleError, ImgqError
from imgq.shared.manifest import Manifest, load_manifest, sha256_file
from imgq.shared.preprocess import preprocess_batch

__all__ = [
    "DEVICES",
    "NOVELTY_RTOL",
    "ModelBundle",
    "bundle_file",
    "bundle_sha256",
    "choose_providers",
    "serving_files",
]

#: Values of ``device``: ``auto`` takes CUDA when onnxruntime can use it, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
#: Largest relative difference of a golden image's novelty, served vs exported (relative to
#: the larger of 1 and its value: novelty is a distance over the threshold, ~1 at the border).
NOVELTY_RTOL = 1e-3

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def choose_providers(device: str, available: Sequence[str]) -> list[str]:
    """The onnxruntime providers for ``device``, given the providers this installation has.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        available: ``onnxruntime.get_available_providers()``.

    Returns:
        Provider names in priority order; CUDA keeps the CPU behind it for unsupported ops.

    Raises:
        BundleError: ``device="cuda"`` where onnxruntime has no CUDA provider.

    >>> choose_providers("auto", ["CPUExecutionProvider"])
    ['CPUExecutionProvider']
    >>> choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    if device not in DEVICES:
        raise BundleError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu" or (device == "auto" and _CUDA not in available):
        return [_CPU]
    if _CUDA not in available:
        raise BundleError(
            f"device 'cuda' asked for, but onnxruntime {ort.__version__} offers only "
            f"{list(available)}: install onnxruntime-gpu (imgq[gpu]) in place of onnxruntime, "
            "or run with --device cpu"
        )
    return [_CUDA, _CPU]


#: Most images per call size and round when measuring the call size: enough for a stable figure.
_CALIBRATE_MAX_IMAGES = 128


def _session_options(threads: int | None) -> ort.SessionOptions:
    """One inference at a time per session, with a fixed, small thread pool."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1 if threads is None else threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads burn a core while waiting for the next batch, which starves the
    # other worker processes and the decode work on the same machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _provider_options(providers: list[str]) -> list[dict[str, str]]:
    # The CUDA provider uses TF32 matmuls/convolutions by default on Ampere and newer; their ~1e-3
    # relative error would break the 1e-4 parity promise of the golden set, so keep full float32.
    return [{"use_tf32": "0"} if p == _CUDA else {} for p in providers]


def bundle_file(name: str) -> str:
    """A bundle file's path, normalised (``./a//b`` is ``a/b``).

    Raises:
        BundleError: a path that is absolute, leaves the bundle or holds a control character
            (a manifest, or a name stored in Redis, is hostile input).
    """
    path = PurePosixPath(name)
    if (not name or path.is_absolute() or ".." in path.parts or "\\" in name
            or len(name) > 255 or any(ord(c) < 32 or c == "\x7f" for c in name)):  # fmt: skip
        raise BundleError(f"a bundle file must be a relative path inside it, got {name!r:.80}")
    return path.as_posix()


def serving_files(manifest: Manifest) -> list[str]:
    """The files of a bundle that serving reads, as normalised paths relative to it (each
    once): the manifest, the model file it names, the golden set, and the training images the
    review page shows beside novel inputs (the novelty gallery).

    Raises:
        BundleError: a path :func:`bundle_file` refuses.
    """
    gallery = manifest.novelty.gallery if manifest.novelty is not None else ()
    names = ["manifest.json", manifest.model_file, *(g.file for g in manifest.golden),
             *(g.file for g in gallery)]  # fmt: skip
    return list(dict.fromkeys(bundle_file(name) for name in names))


def bundle_sha256(file_shas: dict[str, str]) -> str:
    """A bundle's identity: the hash of each serving file's path and sha256, so the same model
    with another manifest is another bundle."""
    digest = hashlib.sha256()
    for name in sorted(file_shas):
        digest.update(f"{name}\0{file_shas[name]}\n".encode())
    return digest.hexdigest()


class ModelBundle:
    """A checked model bundle with its onnxruntime session, ready to serve.

    Build it with :meth:`load`. One per process: the session is not shared between processes.

    Attributes:
        directory: The bundle folder.
        manifest: Its validated manifest.
        provider: The execution provider that runs the model, e.g. ``"CPUExecutionProvider"``.

    Example:

    ```python
    bundle = ModelBundle.load("model/", device="auto", threads=1)
    probs = bundle.classify_images([rgb])          # (1, K) float32
    label = bundle.manifest.labels[int(probs[0].argmax())]
    ```
    """

    def __init__(self, directory: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.directory = directory
        self.manifest = manifest
        self.provider: str = session.get_providers()[0]
        #: Most images per onnxruntime call (None: the whole batch in one call); see
        #: :meth:`calibrate_infer_batch`.
        self.infer_batch: int | None = None
        self._session = session
        self._output_names = [manifest.output_name]
        novelty = manifest.novelty
        self._with_features = (
            [manifest.output_name, novelty.output_name] if novelty is not None else []
        )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        device: str = "auto",
        threads: int | None = None,
        check_golden: bool = True,
    ) -> ModelBundle:
        """Load and check a bundle written by ``imgq train``.

        Args:
            directory: The bundle folder (``manifest.json``, the ONNX file, ``golden/``).
            device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
                Defaults to ``"auto"``.
            threads: onnxruntime intra-op threads; size it so that workers x threads does not
                exceed the cores. Defaults to 1.
            check_golden: Re-run the golden set on this provider (:meth:`check_golden`).
                Defaults to True.

        Raises:
            ManifestError: the manifest is missing or invalid.
            BundleError: the model file's hash, its input or output, the device or the golden
                set do not match the manifest.
        """
        directory = Path(directory)
        manifest = load_manifest(directory)
        model_path = directory / manifest.model_file
        if not model_path.is_file():
            raise BundleError(f"model file {model_path} named by the manifest does not exist")
        actual = sha256_file(model_path)
        if actual != manifest.model_sha256:
            raise BundleError(
                f"{model_path} has sha256 {actual}, but the manifest expects "
                f"{manifest.model_sha256}: the model file was replaced or damaged; restore the "
                "bundle as `imgq train` wrote it, or re-export it"
            )
        providers = choose_providers(device, ort.get_available_providers())
        session = ort.InferenceSession(
            str(model_path),
            sess_options=_session_options(threads),
            providers=providers,
            provider_options=_provider_options(providers),
        )
        if device == "cuda" and session.get_providers()[0] != _CUDA:
            raise BundleError(
                "device 'cuda' asked for, but onnxruntime could not start the CUDA provider "
                "(see its log above: missing CUDA/cuDNN libraries or no GPU); run with "
                "--device cpu or fix the CUDA installation"
            )
        _check_signature(session, manifest)
        bundle = cls(directory, manifest, session)
        if check_golden:
            bundle.check_golden()
        return bundle

    @functools.cached_property
    def version(self) -> str:
        """The bundle's version id (the first 12 hex digits of :func:`bundle_sha256`), the same
        whether it was loaded from a folder or fetched as a published version."""
        shas = {name: sha256_file(self.directory / name) for name in serving_files(self.manifest)}
        return bundle_sha256(shas)[:12]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a preprocessed batch, in onnxruntime calls of at most
        :attr:`infer_batch` images (one call when it is None).

        Args:
            batch: The model input tensor, as :func:`shared.preprocess.preprocess_batch` makes it.

        Returns:
            An (N, K) float32 array; row ``i`` sums to 1 over ``manifest.labels``.
        """
        step = self.infer_batch or len(batch)
        if len(batch) <= step:
            return self._run(batch)
        return np.concatenate([self._run(batch[i : i + step]) for i in range(0, len(batch), step)])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (probs,) = self._session.run(self._output_names, {self.manifest.input_name: batch})
        return np.asarray(probs, dtype=np.float32)

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict`, and the penultimate features the manifest's novelty model scores,
        from the same forward pass.

        Returns:
            ``(probs, features)``: ``(N, K)`` and ``(N, D)`` float32.

        Raises:
            BundleError: the bundle has no novelty model (no features output).
        """
        if not self._with_features:
            raise BundleError(
                f"bundle {self.directory} has no novelty model (manifest version "
                f"{self.manifest.version}): its model has no features output"
            )
        step = self.infer_batch or len(batch)
        parts = [
            self._session.run(self._with_features, {self.manifest.input_name: batch[i : i + step]})
            for i in range(0, max(1, len(batch)), step)
        ]
        if len(parts) == 1:
            probs, features = parts[0]
        else:
            probs = np.concatenate([p for p, _ in parts])
            features = np.concatenate([f for _, f in parts])
        return np.asarray(probs, np.float32), np.asarray(features, np.float32)

    def calibrate_infer_batch(self, max_batch: int, budget_s: float = 2.0) -> dict[int, float]:
        """Measure which onnxruntime call size serves an image fastest here, and use it.

        On a CPU a bigger call is not always cheaper per image: a large model's activations for
        a big call no longer fit the caches, while a small model gains from bigger calls
        (``docs/benchmarks.md`` has both, measured). The worker
        still takes up to ``max_batch`` messages per round trip to Redis and stores their results
        in one; only the model call is split. The sizes tried are the powers of two up to
        ``max_batch`` and ``max_batch`` itself, on random input, interleaved over five rounds,
        timed in this process's CPU time (other processes on the cores, such as a second worker
        measuring at the same moment, do not count), median per size. A size within 5% of the
        fastest loses to a bigger one: fewer calls, less overhead.

        Args:
            max_batch: The worker's largest batch.
            budget_s: About how long the measurement may take at most (a small model needs
                less: each size runs at most 128 images per round). Defaults to 2 seconds.

        Returns:
            Milliseconds per image for each size tried; :attr:`infer_batch` is set to the chosen
            size.
        """
        shape = self.manifest.preprocess.input_shape[1:]
        sizes = sorted(
            {2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch} | {max_batch}
        )
        rng = np.random.default_rng(0)
        inputs = {n: rng.standard_normal((n, *shape), dtype=np.float32) for n in sizes}
        for x in inputs.values():  # the first call of a shape allocates
            self._run(x)
        t0 = time.process_time()
        self._run(inputs[sizes[-1]])
        per_image_s = max((time.process_time() - t0) / sizes[-1], 1e-7)
        rounds = 5
        images = min(_CALIBRATE_MAX_IMAGES, budget_s / (rounds * len(sizes) * per_image_s))
        samples: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(rounds):
            for n in sizes:
                calls = max(1, round(images / n))
                t0 = time.process_time()
                for _ in range(calls):
                    self._run(inputs[n])
                samples[n].append((time.process_time() - t0) / (calls * n))
        cost_s = {n: statistics.median(s) for n, s in samples.items()}
        fastest = min(cost_s.values())
        self.infer_batch = max(n for n in sizes if cost_s[n] <= fastest * 1.05)
        return {n: round(t * 1000, 4) for n, t in cost_s.items()}

    def classify_images(self, rgb_images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities for decoded RGB uint8 images of any sizes (the manifest's preprocessing,
        then :meth:`predict`)."""
        return self.predict(preprocess_batch(rgb_images, self.manifest.preprocess))

    def features_of_images(self, rgb_images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`classify_images` with the features (:meth:`predict_with_features`)."""
        return self.predict_with_features(preprocess_batch(rgb_images, self.manifest.preprocess))

    def check_golden(self, atol: float = 1e-4) -> dict[str, Any]:
        """Re-run the bundle's golden images through the served path and compare with Keras.

        Each golden file is decoded and preprocessed by ``shared/`` exactly as a task's image is,
        and run on this bundle's provider, so a wrong provider build, a changed preprocessing or
        a damaged file shows up before the worker serves anything.

        In a bundle with a novelty model each golden image's novelty is checked too (the
        features output, scored by the manifest's model), to :data:`NOVELTY_RTOL`.

        Args:
            atol: Largest allowed absolute difference of any probability. Defaults to 1e-4.

        Returns:
            ``{"n": images checked, "max_abs_diff": float, "top1_agree": images whose top-1
            label matches, "provider": provider name}``, and ``"novelty_max_rel_diff"`` where
            novelty was checked.

        Raises:
            BundleError: a golden file is missing or undecodable, a top-1 label differs, a
                probability differs by more than ``atol``, or a novelty by more than
                :data:`NOVELTY_RTOL` of itself; the message names the files.
        """
        golden = self.manifest.golden
        if not golden:
            return {"n": 0, "max_abs_diff": 0.0, "top1_agree": 0, "provider": self.provider}
        images = []
        for g in golden:
            path = self.directory / g.file
            try:
                images.append(decode_image(path.read_bytes()))
            except (OSError, ImgqError) as exc:
                raise BundleError(f"golden image {path} cannot be read: {exc}") from exc
        novelty = self.manifest.novelty
        checked = novelty is not None and all(g.novelty is not None for g in golden)
        if checked:
            assert novelty is not None
            served, features = self.features_of_images(images)
            novel = novelty.score(features)[0]
            stored = np.asarray([g.novelty for g in golden], np.float64)
            novelty_diff = np.abs(novel - stored) / np.maximum(1.0, np.abs(stored))
        else:
            served = self.classify_images(images)
            novelty_diff = np.zeros(len(golden))
        expected = np.asarray([g.probs for g in golden], dtype=np.float32)
        diff = np.abs(served - expected).max(axis=1)
        agree = served.argmax(axis=1) == expected.argmax(axis=1)
        labels = self.manifest.labels
        problems = [
            f"{g.file}: expected {labels[int(expected[i].argmax())]} "
            f"{expected[i].max():.6f}, served {labels[int(served[i].argmax())]} "
            f"{served[i].max():.6f}, max |diff| {diff[i]:.2e}"
            for i, g in enumerate(golden)
            if not agree[i] or diff[i] > atol
        ]
        problems += [
            f"{g.file}: novelty expected {g.novelty:.6g}, served {novel[i]:.6g}"
            for i, g in enumerate(golden)
            if checked and not novelty_diff[i] <= NOVELTY_RTOL
        ]
        if problems:
            raise BundleError(
                f"the served path ({self.provider}) does not reproduce the golden set "
                f"(tolerance {atol:g}) on {len(problems)} of {len(golden)} images: "
                + "; ".join(problems)
                + ". The model file, its preprocessing or the execution provider differs from "
                "the one the bundle was exported with"
            )
        figures: dict[str, Any] = {
            "n": len(golden),
            "max_abs_diff": float(diff.max()),
            "top1_agree": int(agree.sum()),
            "provider": self.provider,
        }
        if checked:
            figures["novelty_max_rel_diff"] = float(novelty_diff.max())
        return figures


def _check_signature(session: ort.InferenceSession, manifest: Manifest) -> None:
    """The ONNX graph's input and output must be the ones the manifest describes."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected_shape = list(manifest.preprocess.input_shape)
    if len(inputs) != 1 or inputs[0].name != manifest.input_name:
        raise BundleError(
            f"the model's inputs are {[i.name for i in inputs]}, the manifest names one input "
            f"{manifest.input_name!r}: the manifest belongs to another model; re-export the bundle"
        )
    shape = list(inputs[0].shape)
    fixed = [d if isinstance(d, int) else None for d in shape]
    if len(shape) != len(expected_shape) or fixed[1:] != expected_shape[1:] or fixed[0] is not None:
        raise BundleError(
            f"the model's input {inputs[0].name!r} has shape {shape}, the manifest's "
            f"preprocessing makes {expected_shape} ({manifest.preprocess.layout}, "
            f"{manifest.preprocess.height}x{manifest.preprocess.width}, dynamic batch): "
            "re-export the model or fix the manifest's preprocess section"
        )
    names = [o.name for o in outputs]
    if manifest.output_name not in names:
        raise BundleError(
            f"the model's outputs are {names}, the manifest expects {manifest.output_name!r}"
        )
    width = outputs[names.index(manifest.output_name)].shape[-1]
    if isinstance(width, int) and width != len(manifest.labels):
        raise BundleError(
            f"the model outputs {width} classes, the manifest has {len(manifest.labels)} labels "
            f"{list(manifest.labels)}"
        )
    novelty = manifest.novelty
    if novelty is None:
        return
    if novelty.output_name not in names:
        raise BundleError(
            f"the model's outputs are {names}; the manifest's novelty model reads features from "
            f"{novelty.output_name!r}: the manifest belongs to another model; re-export the bundle"
        )
    width = outputs[names.index(novelty.output_name)].shape[-1]
    if isinstance(width, int) and width != novelty.n_features:
        raise BundleError(
            f"the model's {novelty.output_name!r} output has {width} features, the manifest's "
            f"novelty model {novelty.n_features}: re-export the bundle"
        )
