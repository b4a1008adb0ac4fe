"""shared.preprocess: resize modes, colour order, layout, LUT normalisation, batch == singles."""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np
import pytest

from imgq.shared.decode import decode_base64, decode_image
from imgq.shared.preprocess import (
    PreprocessSpec,
    compute_mean_std,
    normalise_batch,
    preprocess_batch,
    resize_image,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random RGB images of varied sizes and aspects."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(x) for x in rng.integers(20, 90, size=2))
        small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        out.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
    return out


def _naive(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The textbook formula, for comparison with the lookup tables."""
    x = batch[..., ::-1] if spec.color_order == "BGR" else batch
    x = (x.astype(np.float64) * spec.scale - np.array(spec.mean)) / np.array(spec.std)
    return x.transpose(0, 3, 1, 2) if spec.layout == "NCHW" else x


def test_stretch_and_center_crop_differ_as_intended() -> None:
    """Stretch keeps the whole picture squeezed; centre-crop keeps the middle at true aspect."""
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # red side bars that a centre crop removes
    img[:, 60:] = (255, 0, 0)
    img[:, 20:60] = (0, 255, 0)
    crop = resize_image(img, PreprocessSpec(height=16, width=16, resize_mode="center_crop"))
    stretch = resize_image(img, PreprocessSpec(height=16, width=16, resize_mode="stretch"))
    assert (crop == (0, 255, 0)).all()
    assert (stretch[:, :3] == (255, 0, 0)).all() and (stretch[:, 5:11] == (0, 255, 0)).all()


def test_center_crop_of_tall_image_keeps_the_middle_rows() -> None:
    """A tall image is cropped top and bottom, not left and right."""
    img = np.zeros((90, 30, 3), np.uint8)
    img[30:60] = 200
    out = resize_image(img, PreprocessSpec(height=10, width=10, resize_mode="center_crop"))
    assert (out == 200).all()


@pytest.mark.parametrize("interpolation", ["area", "linear", "cubic", "nearest"])
@pytest.mark.parametrize("size", [(16, 16), (24, 40)])
def test_resize_gives_spec_size(interpolation: str, size: tuple[int, int]) -> None:
    """Every interpolation gives a contiguous uint8 image of the spec's height and width."""
    spec = PreprocessSpec(height=size[0], width=size[1], interpolation=interpolation)  # type: ignore[arg-type]
    for img in _images(3):
        out = resize_image(img, spec)
        assert out.shape == (*size, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_nearest_interpolation_is_pixel_exact() -> None:
    """Nearest-neighbour upscaling by 2 repeats every pixel."""
    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    out = resize_image(img, PreprocessSpec(height=16, width=16, interpolation="nearest"))
    np.testing.assert_array_equal(out, img.repeat(2, axis=0).repeat(2, axis=1))


@pytest.mark.parametrize("color_order", ["RGB", "BGR"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_normalise_matches_the_formula(color_order: str, layout: str) -> None:
    """The lookup tables equal ((x * scale) - mean) / std in the spec's colour order and layout."""
    spec = PreprocessSpec(height=32, width=32, mean=MEAN, std=STD,
                          color_order=color_order, layout=layout)  # type: ignore[arg-type]  # fmt: skip
    batch = np.stack([resize_image(img, spec) for img in _images(4)])
    out = normalise_batch(batch, spec)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    assert out.shape == (4, *spec.input_shape[1:])
    np.testing.assert_allclose(out, _naive(batch, spec), rtol=1e-6, atol=1e-6)


def test_bgr_reverses_channels_and_nchw_transposes() -> None:
    """BGR is RGB's channels reversed; NCHW is NHWC transposed, bit for bit."""
    batch = np.stack([resize_image(img, PreprocessSpec(height=16, width=16)) for img in _images(3)])
    base = dict(height=16, width=16, mean=MEAN, std=STD)
    rgb = normalise_batch(batch, PreprocessSpec(**base))  # type: ignore[arg-type]
    bgr = normalise_batch(batch, PreprocessSpec(**base, color_order="BGR"))  # type: ignore[arg-type]
    bgr_nchw = normalise_batch(batch, PreprocessSpec(**base, color_order="BGR", layout="NCHW"))  # type: ignore[arg-type]
    # Mean/std are given in the model's colour order, so compare pixel values, not tables.
    same_stats = dict(height=16, width=16, mean=(0.4,) * 3, std=(0.3,) * 3)
    a = normalise_batch(batch, PreprocessSpec(**same_stats))  # type: ignore[arg-type]
    b = normalise_batch(batch, PreprocessSpec(**same_stats, color_order="BGR"))  # type: ignore[arg-type]
    np.testing.assert_array_equal(a[..., ::-1], b)
    np.testing.assert_array_equal(bgr.transpose(0, 3, 1, 2), bgr_nchw)
    assert not np.array_equal(rgb, bgr)


@pytest.mark.parametrize("n", [1, 5, 32])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("resize_mode", ["stretch", "center_crop"])
def test_batch_equals_stacked_single_images(n: int, layout: str, resize_mode: str) -> None:
    """preprocess_batch of N images is byte-identical to stacking N one-image calls."""
    spec = PreprocessSpec(height=24, width=32, mean=MEAN, std=STD, layout=layout,  # type: ignore[arg-type]
                          resize_mode=resize_mode, color_order="BGR")  # type: ignore[arg-type]  # fmt: skip
    images = _images(n, seed=n)
    batch = preprocess_batch(images, spec)
    singles = np.concatenate([preprocess_batch([img], spec) for img in images])
    assert batch.tobytes() == singles.tobytes()
    assert batch.shape == (n, *spec.input_shape[1:]) and batch.flags["C_CONTIGUOUS"]


def test_trainer_and_worker_paths_give_identical_tensors(tmp_path: Path) -> None:
    """The same files give the same bytes from files in one batch (trainer) and from base64 one
    by one (worker)."""
    spec = PreprocessSpec(height=32, width=32, mean=MEAN, std=STD, resize_mode="center_crop")
    paths = []
    for i, img in enumerate(_images(6, seed=7)):
        ext = ".jpg" if i % 2 else ".png"
        path = tmp_path / f"img{i}{ext}"
        path.write_bytes(cv2.imencode(ext, img[..., ::-1])[1].tobytes())
        paths.append(path)
    trainer = preprocess_batch([decode_image(p.read_bytes()) for p in paths], spec)
    messages = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    worker = np.concatenate(
        [preprocess_batch([decode_image(decode_base64(m))], spec) for m in messages]
    )
    assert trainer.tobytes() == worker.tobytes()


def test_empty_batch_has_the_right_shape() -> None:
    """No images give an empty tensor of the model's shape, not an error."""
    spec = PreprocessSpec(height=16, width=16, layout="NCHW")
    assert preprocess_batch([], spec).shape == (0, 3, 16, 16)


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((8, 8), np.uint8), r"\(height, width, 3\) RGB uint8 array, got uint8 \(8, 8\)"),
        (np.zeros((8, 8, 4), np.uint8), r"got uint8 \(8, 8, 4\)"),
        (np.zeros((8, 8, 3), np.float32), r"got float32 \(8, 8, 3\)"),
        (np.zeros((0, 8, 3), np.uint8), "non-empty image"),
    ],
)
def test_resize_refuses_wrong_arrays(bad: np.ndarray, message: str) -> None:
    """A wrong array is refused with its dtype and shape in the message."""
    with pytest.raises(ValueError, match=message):
        resize_image(bad, PreprocessSpec(height=8, width=8))


def test_normalise_refuses_wrong_batches() -> None:
    """normalise_batch wants (N, H, W, 3) uint8."""
    spec = PreprocessSpec(height=8, width=8)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8 array, got \(8, 8, 3\)"):
        normalise_batch(np.zeros((8, 8, 3), np.uint8), spec)
    with pytest.raises(ValueError, match="uint8 pixels, got float32"):
        normalise_batch(np.zeros((1, 8, 8, 3), np.float32), spec)


def test_compute_mean_std_matches_numpy() -> None:
    """Histogram statistics equal numpy's mean and std over all pixels, in either colour order."""
    images = _images(5, seed=3)
    pixels = np.concatenate([img.reshape(-1, 3) for img in images]).astype(np.float64) / 255
    mean, std = compute_mean_std(images, 1 / 255)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-9)
    mean_bgr, std_bgr = compute_mean_std(iter(images), 1 / 255, color_order="BGR")
    assert mean_bgr == mean[::-1] and std_bgr == std[::-1]
    PreprocessSpec(height=8, width=8, mean=mean, std=std)  # ready for the spec


def test_compute_mean_std_refuses_nothing_and_constants() -> None:
    """No pixels, or a constant channel, cannot give normalisation statistics."""
    with pytest.raises(ValueError, match="no pixels"):
        compute_mean_std([], 1 / 255)
    with pytest.raises(ValueError, match="constant channel"):
        compute_mean_std([np.full((4, 4, 3), 9, np.uint8)], 1 / 255)


@pytest.mark.parametrize("size", [(224, 224), (64, 64), (100, 30)])
def test_area_resize_stays_close_to_single_inter_area(size: tuple[int, int]) -> None:
    """The two-step area reduction gives nearly the picture of one cv2 INTER_AREA call."""
    img = cv2.resize(_images(1, seed=5)[0], (640, 480), interpolation=cv2.INTER_CUBIC)
    out = resize_image(img, PreprocessSpec(height=size[0], width=size[1]))
    ref = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(np.int16) - ref).mean() < 2.0
