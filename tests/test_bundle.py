"""worker/bundle.py: loading and checking a model bundle with onnxruntime, and `imgq verify`.

These tests build a tiny bundle by hand (an ONNX graph made with onnx.helper: mean colour ->
linear -> softmax), so they need no TensorFlow and run in a second; tests/test_trainer.py checks
bundles that the trainer wrote.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from imgq.cli import main as imgq
from imgq.shared.bundle import ModelBundle, choose_providers
from imgq.shared.errors import BundleError
from imgq.shared.imagestats import IMAGE_FEATURES
from imgq.shared.manifest import GoldenImage, Manifest, load_manifest, save_manifest, sha256_file
from imgq.shared.preprocess import PreprocessSpec
from imgq.shared.reference import build_reference

LABELS = ("red", "green", "blue")
SIZE = 16


def _tiny_onnx(path: Path, size: int = SIZE) -> None:
    """NHWC float32 image -> mean per channel -> x @ W -> softmax: 'which colour dominates'."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], (np.eye(3) * 8).ravel().tolist())
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _colour_image(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(0, 60, (24, 30, 3))
    return np.clip(np.array(rgb) * 0.7 + noise, 0, 255).astype(np.uint8)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A valid bundle around the tiny model, with a golden set of 3 PNGs."""
    out = tmp_path / "bundle"
    out.mkdir()
    _tiny_onnx(out / "model.onnx")
    spec = PreprocessSpec(height=SIZE, width=SIZE)
    reference = build_reference(np.random.default_rng(0).random((20, 13)), IMAGE_FEATURES)
    manifest = Manifest(
        name="tiny", model_file="model.onnx", model_sha256=sha256_file(out / "model.onnx"),
        input_name="image", output_name="probs", input_shape=spec.input_shape,
        labels=LABELS, preprocess=spec, reference=reference,
    )  # fmt: skip
    save_manifest(manifest, out)
    rng = np.random.default_rng(0)
    images = [_colour_image(c, rng) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for label, rgb in zip(LABELS, images, strict=True):
        _write_png(out / "golden" / f"{label}.png", rgb)
    probs = ModelBundle.load(out, device="cpu", check_golden=False).classify_images(images)
    golden = tuple(
        GoldenImage(file=f"golden/{label}.png", probs=tuple(map(float, p)), label=label)
        for label, p in zip(LABELS, probs, strict=True)
    )
    save_manifest(dataclasses.replace(manifest, golden=golden), out)
    return out


def _edit_manifest(bundle: Path, **changes: object) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_load_checks_golden_on_cpu(tiny_bundle: Path) -> None:
    """A good bundle loads on the CPU provider and reproduces its golden probabilities."""
    bundle = ModelBundle.load(tiny_bundle, device="cpu")
    assert bundle.provider == "CPUExecutionProvider"
    result = bundle.check_golden()
    assert result["n"] == 3 and result["top1_agree"] == 3
    assert result["max_abs_diff"] < 1e-6


def test_predict_returns_probabilities(tiny_bundle: Path) -> None:
    """classify_images gives one float32 probability row per image, in label order."""
    bundle = ModelBundle.load(tiny_bundle, device="cpu")
    rng = np.random.default_rng(1)
    probs = bundle.classify_images(
        [_colour_image((0, 0, 255), rng), _colour_image((255, 0, 0), rng)]
    )
    assert probs.dtype == np.float32 and probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert [LABELS[i] for i in probs.argmax(axis=1)] == ["blue", "red"]


def test_predict_in_calls_of_infer_batch_gives_the_same_rows(tiny_bundle: Path) -> None:
    """A batch split into model calls of infer_batch images (last call short) gives the rows of
    one call, in order; the calls really are that size."""
    bundle = ModelBundle.load(tiny_bundle, device="cpu")
    batch = np.random.default_rng(2).standard_normal((11, SIZE, SIZE, 3), dtype=np.float32)
    whole = bundle.predict(batch)
    sizes: list[int] = []
    run = bundle._run
    bundle._run = lambda x: (sizes.append(len(x)), run(x))[1]  # type: ignore[method-assign]
    bundle.infer_batch = 4
    np.testing.assert_allclose(bundle.predict(batch), whole, atol=1e-6)
    assert sizes == [4, 4, 3]


def test_calibration_measures_every_size_and_picks_one(tiny_bundle: Path) -> None:
    """Calibration times each power of two up to max_batch, and max_batch itself, and uses a
    size within 5% of the fastest per image."""
    bundle = ModelBundle.load(tiny_bundle, device="cpu")
    ms = bundle.calibrate_infer_batch(12, budget_s=0.3)
    assert sorted(ms) == [1, 2, 4, 8, 12]
    assert all(t > 0 for t in ms.values())
    assert bundle.infer_batch in ms
    assert ms[bundle.infer_batch] <= min(ms.values()) * 1.05


def test_session_threads_and_spinning(tiny_bundle: Path) -> None:
    """The session runs with the requested intra-op threads, one inter-op thread, no spinning."""
    bundle = ModelBundle.load(tiny_bundle, device="cpu", threads=2)
    options = bundle._session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_tampered_model_is_refused_with_both_hashes(tiny_bundle: Path) -> None:
    """A model file that does not hash to the manifest's sha256 is refused, naming both."""
    expected = load_manifest(tiny_bundle).model_sha256
    model = tiny_bundle / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256") as info:
        ModelBundle.load(tiny_bundle, device="cpu")
    assert expected in str(info.value) and sha256_file(model) in str(info.value)


def test_tampered_golden_probability_names_the_file(tiny_bundle: Path) -> None:
    """A golden probability the served path does not reproduce fails the load, naming the file."""
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    data["golden"][1]["probs"] = np.roll(data["golden"][1]["probs"], 1).tolist()
    _edit_manifest(tiny_bundle, golden=data["golden"])
    with pytest.raises(BundleError, match="golden/green.png"):
        ModelBundle.load(tiny_bundle, device="cpu")
    ModelBundle.load(tiny_bundle, device="cpu", check_golden=False)  # the check is optional


def test_small_difference_beyond_tolerance_fails(tiny_bundle: Path) -> None:
    """A golden probability 1e-3 off fails even when the top-1 label still agrees."""
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    data["golden"][0]["probs"][0] -= 1e-3
    _edit_manifest(tiny_bundle, golden=data["golden"])
    bundle = ModelBundle.load(tiny_bundle, device="cpu", check_golden=False)
    with pytest.raises(BundleError, match=r"\(tolerance 0.0001\) on 1 of 3 images: golden/red.png"):
        bundle.check_golden()
    assert bundle.check_golden(atol=2e-3)["n"] == 3


def test_input_shape_mismatch_names_both_shapes(tiny_bundle: Path) -> None:
    """A manifest whose preprocessing makes another input size than the model takes is refused."""
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    _edit_manifest(
        tiny_bundle,
        input_shape=[None, 24, 24, 3],
        preprocess=data["preprocess"] | {"height": 24, "width": 24},
    )
    with pytest.raises(BundleError, match=r"shape \['batch', 16, 16, 3\].*\[None, 24, 24, 3\]"):
        ModelBundle.load(tiny_bundle, device="cpu")


def test_input_name_mismatch(tiny_bundle: Path) -> None:
    """A manifest naming another input tensor is refused with both names."""
    _edit_manifest(tiny_bundle, input_name="input_1")
    with pytest.raises(BundleError, match=r"\['image'\].*'input_1'"):
        ModelBundle.load(tiny_bundle, device="cpu")


def test_choose_providers() -> None:
    """auto takes CUDA only when onnxruntime offers it; cpu never does; cuda without it fails."""
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", gpu) == gpu
    assert choose_providers("cpu", gpu) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(BundleError, match="onnxruntime-gpu"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(BundleError, match="device must be one of"):
        choose_providers("tpu", gpu)


def test_auto_device_follows_available_providers(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` asks onnxruntime which providers exist (faked here: this one has no CUDA)."""
    seen = []

    def available() -> list[str]:
        seen.append(True)
        return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", available)
    assert ModelBundle.load(tiny_bundle).provider == "CPUExecutionProvider"
    assert seen


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here"
)
def test_cuda_without_gpu_build_is_refused(tiny_bundle: Path) -> None:
    """--device cuda on an onnxruntime without CUDA fails with the fix in the message."""
    with pytest.raises(BundleError, match="install onnxruntime-gpu"):
        ModelBundle.load(tiny_bundle, device="cuda")


@pytest.mark.gpu
def test_cuda_provider_reproduces_golden(tiny_bundle: Path) -> None:
    """On a GPU machine the CUDA provider runs the model and passes the golden check."""
    bundle = ModelBundle.load(tiny_bundle, device="cuda")
    assert bundle.provider == "CUDAExecutionProvider"
    assert bundle.check_golden()["top1_agree"] == 3


def test_verify_command(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`imgq verify` passes on a good bundle and reports accuracy on a labelled folder."""
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    for label, colour in zip(LABELS, ((255, 0, 0), (0, 255, 0), (0, 0, 255)), strict=True):
        for i in range(3):
            _write_png(data / label / f"{i}.png", _colour_image(colour, rng))
    assert imgq(["verify", str(tiny_bundle), str(data), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "golden set: 3 images, top-1 agree 3/3" in out
    assert "accuracy on" in out and "1.0000 (9/9)" in out


def test_verify_fails_on_unknown_class_folder(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data folder with a class the model does not know makes `imgq verify` exit 1."""
    _write_png(tmp_path / "data" / "purple" / "0.png", np.zeros((20, 20, 3), np.uint8))
    assert imgq(["verify", str(tiny_bundle), str(tmp_path / "data"), "--device", "cpu"]) == 1
    assert "['purple']" in capsys.readouterr().out


def test_verify_fails_on_tampered_model(
    tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`imgq verify` exits 1 and says why when the model file was changed."""
    model = tiny_bundle / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1])
    assert imgq(["verify", str(tiny_bundle), "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out
