"""shared.imagestats: per-image features see each drift of issue 5, references merge by addition."""

from __future__ import annotations

import json
from collections.abc import Callable

import cv2
import numpy as np
import pytest

from imgq.shared.imagestats import (
    IMAGE_FEATURES,
    OUTPUT_FEATURES,
    decoded_image_features,
    image_features,
    output_features,
)
from imgq.shared.preprocess import PreprocessSpec, resize_image
from imgq.shared.reference import (
    FeatureReference,
    ReferenceStats,
    bin_counts,
    build_reference,
    out_of_range,
)

#: The sample model's input (`imgq train`'s default): pixel features are of the model's input.
SPEC = PreprocessSpec(height=32, width=32)


def _scene(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A textured, coloured RGB picture with edges: shapes on a noisy gradient."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(40, 220, (6, 8, 3), dtype=np.uint8), (w, h),
                     interpolation=cv2.INTER_CUBIC)  # fmt: skip
    for _ in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, centre, int(rng.integers(5, 30)), colour, -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _row(rgb: np.ndarray, encoded_bytes: int, spec: PreprocessSpec = SPEC) -> np.ndarray:
    """The feature row of one decoded image served by a model with ``spec``."""
    return decoded_image_features([rgb], [encoded_bytes], spec)[0]


def _features(rgb: np.ndarray, quality: int = 90) -> dict[str, float]:
    data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
    return dict(zip(IMAGE_FEATURES, _row(rgb, len(data)).tolist(), strict=True))


SCENES = [_scene(s) for s in range(6)]


def _mean_ratio(shift: Callable[[np.ndarray], np.ndarray], feature: str) -> float:
    """Mean over scenes of feature(shifted) / feature(original)."""
    return float(np.mean([_features(shift(s))[feature] / _features(s)[feature] for s in SCENES]))


def test_features_of_a_flat_gray_image() -> None:
    """A flat mid-gray image: brightness 0.5, no contrast, no saturation, no edges."""
    f = _features(np.full((60, 90, 3), 128, np.uint8))
    assert f["brightness"] == pytest.approx(128 / 255)
    assert f["contrast"] == f["saturation"] == f["sharpness"] == 0.0
    assert f["dark_fraction"] == f["bright_fraction"] == 0.0
    assert (f["width"], f["height"], f["aspect"]) == (90, 60, 1.5)


def test_horizontal_flip_changes_nothing() -> None:
    """Every feature is invariant to a horizontal flip (the benign shift of issue 5): exactly
    when the model's resize is mirror-symmetric (linear), within resampling noise with OpenCV's
    area resize at a fractional ratio, which is not (the model sees that difference too)."""
    linear = PreprocessSpec(height=224, width=224, interpolation="linear")
    for s in SCENES + [_scene(9, 480, 640)]:
        flipped = np.ascontiguousarray(s[:, ::-1])
        np.testing.assert_allclose(_row(flipped, 5000, linear), _row(s, 5000, linear), rtol=1e-9)
        diff = np.abs(_row(flipped, 5000) - _row(s, 5000))
        sharpness = IMAGE_FEATURES.index("sharpness")
        assert diff[sharpness] < 0.25 and np.delete(diff, sharpness).max() < 0.005, diff


def test_an_image_gets_the_same_features_alone_or_in_any_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exact sums: a worker's answer does not depend on the batch-mates (nor on chunking)."""
    scenes = SCENES + [_scene(s, 60 + 9 * s, 300 - 7 * s) for s in range(10)]
    inputs = np.stack([resize_image(s, SPEC) for s in scenes])
    originals = np.array([[s.shape[1], s.shape[0], 1000 + i] for i, s in enumerate(scenes)])
    batch = image_features(inputs, originals)
    assert batch.shape == (len(scenes), len(IMAGE_FEATURES)) and batch.dtype == np.float64
    for i in range(len(scenes)):
        assert np.array_equal(image_features(inputs[i : i + 1], originals[i : i + 1])[0], batch[i])
    assert np.array_equal(image_features(inputs[::-1], originals[::-1])[::-1], batch)
    monkeypatch.setattr("imgq.shared.imagestats._CHUNK_PX", 3 * 32 * 32)  # chunks of 3 images
    assert np.array_equal(image_features(inputs, originals), batch)
    assert image_features(inputs[:0], originals[:0]).shape == (0, len(IMAGE_FEATURES))
    # Inputs over 64 pixels a side are block-averaged first: still independent of the batch.
    big = np.stack([resize_image(s, PreprocessSpec(height=100, width=140)) for s in scenes])
    big_batch = image_features(big, originals)
    for i in range(len(scenes)):
        assert np.array_equal(image_features(big[i : i + 1], originals[i : i + 1])[0], big_batch[i])


def test_large_inputs_are_reduced_to_block_means() -> None:
    """224 x 224 (MobileNetV2) is measured as its 4 x 4 block means, 56 x 56: the same values
    as OpenCV's area resize of each image alone; 100 x 140 as 3 x 3 blocks of the centre."""
    spec = PreprocessSpec(height=224, width=224)
    inputs = np.stack([resize_image(s, spec) for s in SCENES])
    sizes = np.tile([160, 120, 5000], (len(SCENES), 1))
    reduced = np.stack([cv2.resize(x, (56, 56), interpolation=cv2.INTER_AREA) for x in inputs])
    np.testing.assert_array_equal(image_features(inputs, sizes), image_features(reduced, sizes))
    odd = np.stack([resize_image(s, PreprocessSpec(height=100, width=140)) for s in SCENES])
    centre = np.stack(
        [cv2.resize(x[0:99, 1:139], (46, 33), interpolation=cv2.INTER_AREA) for x in odd]
    )
    np.testing.assert_array_equal(image_features(odd, sizes), image_features(centre, sizes))


def test_darkening_lowers_brightness() -> None:
    """Brightness x0.6 shows as brightness x0.6."""
    ratio = _mean_ratio(lambda s: (s * 0.6).astype(np.uint8), "brightness")
    assert ratio == pytest.approx(0.6, abs=0.02)


def test_blur_and_low_resolution_lower_sharpness() -> None:
    """Gaussian blur sigma 2 and a x4 down-and-up resize of a 160 x 120 picture both roughly
    halve the Laplacian variance the 32 x 32 model input keeps (sharpness is its log1p)."""

    def blur(s: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(s, (0, 0), 2)

    def lowres(s: np.ndarray) -> np.ndarray:
        small = cv2.resize(s, (s.shape[1] // 4, s.shape[0] // 4), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (s.shape[1], s.shape[0]), interpolation=cv2.INTER_LINEAR)

    for shift in (blur, lowres):
        drops = [_features(s)["sharpness"] - _features(shift(s))["sharpness"] for s in SCENES]
        assert min(drops) > 0.4, f"{shift.__name__}: log-variance drops {drops}"


def test_colour_cast_moves_the_channel_means() -> None:
    """A warm cast (red up, blue down) moves mean_r up and mean_b down."""

    def cast(s: np.ndarray) -> np.ndarray:
        return np.clip(s.astype(np.int16) + (40, 0, -40), 0, 255).astype(np.uint8)

    assert _mean_ratio(cast, "mean_r") > 1.2
    assert _mean_ratio(cast, "mean_b") < 0.8


def test_heavy_jpeg_compression_lowers_bytes_per_pixel() -> None:
    """Quality 15 needs far fewer bytes per pixel than quality 90."""
    ratio = float(np.mean([_features(s, 15)["bytes_per_pixel"] / _features(s, 90)["bytes_per_pixel"]
                           for s in SCENES]))  # fmt: skip
    assert ratio < 0.5


def test_image_features_refuses_wrong_arrays() -> None:
    """Only (N, H, W, 3) uint8 batches with one positive size row per image are accepted."""
    sizes = np.array([[10, 10, 100]])
    with pytest.raises(
        ValueError, match=r"\(N, H, W, 3\) uint8 array of model inputs, got \(4, 4, 3\)"
    ):
        image_features(np.zeros((4, 4, 3), np.uint8), sizes)
    with pytest.raises(ValueError, match="needs uint8 pixels, got float64"):
        image_features(np.zeros((1, 4, 4, 3)), sizes)
    with pytest.raises(ValueError, match=r"at least 3 x 3, got \(1, 2, 8, 3\)"):
        image_features(np.zeros((1, 2, 8, 3), np.uint8), sizes)
    with pytest.raises(ValueError, match=r"\(1, 3\) positive original widths.*shape \(2, 3\)"):
        image_features(np.zeros((1, 4, 4, 3), np.uint8), np.ones((2, 3)))
    with pytest.raises(ValueError, match="positive original widths"):
        image_features(np.zeros((1, 4, 4, 3), np.uint8), np.array([[10, 0, 100]]))
    with pytest.raises(ValueError, match="2 images but 1 encoded lengths"):
        decoded_image_features([np.zeros((4, 4, 3), np.uint8)] * 2, [10], SPEC)


def test_output_features() -> None:
    """Predicted class, top-1 confidence and top-1 minus top-2 margin per row."""
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0], [0.05, 0.05, 0.9]])
    out = output_features(probs)
    assert out.shape == (3, len(OUTPUT_FEATURES)) and out.dtype == np.float64
    np.testing.assert_allclose(out, [[1, 0.6, 0.3], [0, 0.5, 0.0], [2, 0.9, 0.85]])
    with pytest.raises(ValueError, match=r"\(N, K >= 2\)"):
        output_features(np.array([0.2, 0.8]))


def _reference_data(n: int, seed: int) -> np.ndarray:
    """Feature-like columns: bounded, skewed, heavy-tailed and discrete."""
    r = np.random.default_rng(seed)
    cols = [
        r.normal(0.5, 0.1, n), r.normal(0.2, 0.05, n), r.beta(2, 5, n), r.beta(5, 2, n),
        r.beta(3, 3, n), r.gamma(2, 0.1, n), np.clip(r.normal(0, 0.05, n), 0, None),
        np.clip(r.normal(0, 0.05, n), 0, None), r.normal(5, 1, n),
        r.choice([96.0, 128.0, 160.0, 200.0], n), r.integers(64, 256, n).astype(float),
        r.lognormal(0, 0.2, n), r.lognormal(-1, 0.5, n),
    ]  # fmt: skip
    return np.stack(cols, axis=1)


def test_reference_bins_are_equal_mass_and_open_ended() -> None:
    """Continuous features get n_bins equal-mass bins between -inf and +inf."""
    values = _reference_data(1000, 0)
    ref = build_reference(values, IMAGE_FEATURES, n_bins=10)
    assert ref.n_images == 1000
    f = ref.features["brightness"]
    assert f.edges[0] == -np.inf and f.edges[-1] == np.inf and len(f.counts) == 10
    assert all(95 <= c <= 105 for c in f.counts)
    assert f.mean == pytest.approx(values[:, 0].mean())


def test_discrete_and_constant_features_get_merged_bins() -> None:
    """Repeated quantile edges are merged; a constant feature has below/equal/above bins."""
    values = np.stack([np.full(50, 7.0), np.repeat([1.0, 2.0, 3.0], [10, 30, 10])], axis=1)
    ref = build_reference(values, ["const", "three"])
    const = ref.features["const"]
    assert len(const.edges) == 4 and const.edges[1] == 7.0 and const.counts == (0, 50, 0)
    assert bin_counts(ref, np.array([[6.9, 0], [7.0, 0], [7.1, 0]]), ["const", "three"])[
        "const"
    ].tolist() == [1, 1, 1]
    three = ref.features["three"]
    assert three.edges[1:4] == (1.0, 2.0, 3.0) and three.counts == (0, 10, 30, 10, 0)


def test_categorical_feature_has_one_bin_per_class() -> None:
    """A categorical feature gets one bin per class and is never out of range."""
    values = np.array([[0.0, 0.9], [2.0, 0.8], [2.0, 0.7], [3.0, 0.95]])
    ref = build_reference(values, ["predicted_class", "confidence"],
                          categorical={"predicted_class": 4})  # fmt: skip
    f = ref.features["predicted_class"]
    assert f.categorical and f.counts == (1, 0, 2, 1)
    assert out_of_range(ref, np.array([3.0, 0.8]), ["predicted_class", "confidence"]) == []


def test_about_one_percent_or_fewer_held_out_images_are_out_of_range() -> None:
    """Held-out in-distribution rows have *any* feature out of range in <= 1% of cases."""
    for seed in range(3):
        ref = build_reference(_reference_data(1000, seed), IMAGE_FEATURES)
        held_out = _reference_data(5000, seed + 100)
        flagged = [bool(out_of_range(ref, row, IMAGE_FEATURES)) for row in held_out]
        assert np.mean(flagged) <= 0.01, f"seed {seed}: {np.mean(flagged):.3%} flagged"


def test_real_image_features_stay_in_range_when_held_out() -> None:
    """Features of unseen scenes like the reference's stay in range; a darkened one does not."""
    ref_rows = np.stack([_row(_scene(s), 9000) for s in range(100, 160)])
    ref = build_reference(ref_rows, IMAGE_FEATURES)
    held = [out_of_range(ref, _row(_scene(s), 9000), IMAGE_FEATURES) for s in range(6)]
    assert sum(map(bool, held)) <= 1
    dark = (_scene(1).astype(np.float64) * 0.2).astype(np.uint8)
    assert "brightness" in out_of_range(ref, _row(dark, 9000), IMAGE_FEATURES)


def test_out_of_range_names_the_features() -> None:
    """Values beyond the widened reference range are named; NaN is out of range."""
    ref = build_reference(_reference_data(500, 1), IMAGE_FEATURES)
    row = _reference_data(1, 2)[0]
    assert out_of_range(ref, row, IMAGE_FEATURES) == []
    row[0], row[9] = 99.0, np.nan
    assert out_of_range(ref, row, IMAGE_FEATURES) == ["brightness", "width"]
    with pytest.raises(KeyError, match="'nope' is not in the reference"):
        out_of_range(ref, np.array([1.0]), ["nope"])


def test_bin_counts_add_up_across_halves() -> None:
    """Counts of two halves sum to the counts of the whole (workers merge by addition)."""
    values = _reference_data(800, 3)
    ref = build_reference(values, IMAGE_FEATURES)
    whole = bin_counts(ref, values, IMAGE_FEATURES)
    first, second = (
        bin_counts(ref, values[:300], IMAGE_FEATURES),
        bin_counts(ref, values[300:], IMAGE_FEATURES),
    )
    for name in IMAGE_FEATURES:
        assert whole[name].dtype == np.int64
        np.testing.assert_array_equal(first[name] + second[name], whole[name])
        assert tuple(whole[name]) == ref.features[name].counts


def test_reference_round_trips_through_json_exactly() -> None:
    """to_dict/from_dict survive strict JSON (no Infinity tokens) with every float exact."""
    ref = build_reference(np.concatenate([_reference_data(300, 4), np.zeros((300, 1))], axis=1),
                          [*IMAGE_FEATURES, "predicted_class"],
                          categorical={"predicted_class": 3})  # fmt: skip
    text = json.dumps(ref.to_dict(), allow_nan=False)
    assert ReferenceStats.from_dict(json.loads(text)) == ref


@pytest.mark.parametrize(
    "change,message",
    [
        ({"edges": [0.0, 1.0]}, "2 edges for 2 counts"),
        ({"edges": ["-inf", 1.0, 1.0]}, "edges must increase strictly"),
        ({"low": "big"}, "expected a number, 'inf' or '-inf', got 'big'"),
        ({"counts": [-1, 2]}, "counts must be >= 0"),
    ],
)
def test_feature_reference_validates(change: dict[str, object], message: str) -> None:
    """A malformed stored feature raises ValueError saying what is wrong."""
    good = FeatureReference("x", (-np.inf, 1.0, np.inf), (1, 2), 0.0, 2.0, 1.0).to_dict()
    with pytest.raises(ValueError, match=message):
        FeatureReference.from_dict(good | change)


def test_build_reference_refuses_bad_input() -> None:
    """NaN values, mismatched names and unknown categorical names are refused."""
    with pytest.raises(ValueError, match=r"NaN or infinite values in \['b'\]"):
        build_reference(np.array([[1.0, np.nan]]), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(N >= 1, 3\) matrix"):
        build_reference(np.zeros((4, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="categorical names"):
        build_reference(np.zeros((4, 1)), ["a"], categorical={"b": 2})
