"""Novelty scores compared on one bundle (issue 26): which separates images of classes the model
never saw from held-out images of its own classes, in its own outputs and features.

``bench/drift.py --compare-scores`` calls :func:`compare`; it is no benchmark on its own. Every
score is computed from what the served bundle gives (onnxruntime's probabilities and
penultimate features) and the training split's features, as OpenOOD v1.5 compares them:

* ``msp``: 1 - the top-1 probability (Hendrycks & Gimpel 2017), the output side's own view;
* ``energy``: -logsumexp of the logits (Liu et al. 2020), the logits made from the features by
  the model's last dense layer, read from the ONNX graph;
* ``knn``: distance to the k-th nearest training feature, features L2-normalised (Sun et al.
  2022), k = 1 and 10;
* ``mahalanobis_shared``: Mahalanobis distance to the nearest class mean with one covariance
  shared by the classes (Lee et al. 2018);
* ``class_gaussian``: the bundle's own score (``shared/novelty.py``): a covariance per class,
  shrunk towards the shared one, on the top principal components.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from imgq.shared.bundle import ModelBundle

__all__ = ["auroc", "compare"]

Score = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (features, probs) -> novelty


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of a score that should be higher for ``positive``: the
    probability that a random positive scores above a random negative (ties count a half).

    >>> auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])), auroc(np.array([1.0]), np.array([1.0]))
    (1.0, 0.5)
    """
    scores = np.concatenate([negative, positive])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # mid-ranks for ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_neg, n_pos = len(negative), len(positive)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_neg * n_pos))


def _dense_layer(bundle: ModelBundle) -> tuple[np.ndarray, np.ndarray] | None:
    """The weights and bias that turn the features output into logits, read from the ONNX
    graph (tf2onnx writes a MatMul on the features, then an Add), or None."""
    novelty = bundle.manifest.novelty
    if novelty is None:
        return None
    model = onnx.load(str(bundle.directory / bundle.manifest.model_file))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in consumers.get(novelty.output_name, []):
        if node.op_type == "MatMul" and node.input[1] in weights:
            w = weights[node.input[1]]
            bias = next(
                (weights[i] for n in consumers.get(node.output[0], []) if n.op_type == "Add"
                 for i in n.input if i in weights),
                np.zeros(w.shape[1], np.float32),
            )  # fmt: skip
            return w, bias
        if node.op_type == "Gemm" and node.input[1] in weights:
            b = weights[node.input[2]] if len(node.input) > 2 else np.zeros(1, np.float32)
            return weights[node.input[1]], b
    return None


def _scores(bundle: ModelBundle, train: np.ndarray, y: np.ndarray) -> dict[str, Score]:
    """Each score, fitted on the training split's features ``train`` and classes ``y``."""
    novelty = bundle.manifest.novelty
    assert novelty is not None
    k = len(bundle.manifest.labels)
    scores: dict[str, Score] = {"msp": lambda f, p: 1.0 - p.max(axis=1)}
    dense = _dense_layer(bundle)
    if dense is not None:
        w, b = dense

        def energy(f: np.ndarray, p: np.ndarray) -> np.ndarray:
            logits = f.astype(np.float64) @ w + b
            top = logits.max(axis=1)
            return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))

        scores["energy"] = energy
    bank = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)

    def knn(nth: int) -> Score:
        def score(f: np.ndarray, p: np.ndarray) -> np.ndarray:
            g = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            similarity = np.sort(g @ bank.T, axis=1)
            return 1.0 - similarity[:, -nth]

        return score

    scores["knn_k1"], scores["knn_k10"] = knn(1), knn(10)
    means = np.stack([train[y == c].mean(axis=0) for c in range(k)])
    residual = train - means[y]
    shared = residual.T @ residual / max(1, len(train) - k)
    precision = np.linalg.pinv(shared)

    def mahalanobis_shared(f: np.ndarray, p: np.ndarray) -> np.ndarray:
        d = f[:, None, :] - means[None]
        return np.einsum("nkd,de,nke->nk", d, precision, d).min(axis=1)

    scores["mahalanobis_shared"] = mahalanobis_shared
    scores["class_gaussian"] = lambda f, p: novelty.score(f)[0]
    return scores


def compare(
    bundle: ModelBundle,
    train: tuple[np.ndarray, np.ndarray],
    negatives: dict[str, tuple[np.ndarray, np.ndarray]],
    positives: dict[str, tuple[np.ndarray, np.ndarray]],
) -> list[str]:
    """AUROC of every score, unseen classes against in-distribution images, as table lines.

    Args:
        bundle: The served bundle (with a novelty model).
        train: The training split's ``(features, classes)``.
        negatives: In-distribution images by name (e.g. the test split, fresh traffic):
            ``(features, probs)``.
        positives: Images of unseen classes by name: ``(features, probs)``; ``"all"`` first.
    """
    scores = _scores(bundle, *train)
    columns = [(n, p) for n in negatives for p in positives]
    lines = [
        "| score | " + " | ".join(f"{p} vs {n}" for n, p in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, fn in scores.items():
        cells = []
        for n, p in columns:
            neg, pos = fn(*negatives[n]), fn(*positives[p])
            cells.append(f"{auroc(neg, pos):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
