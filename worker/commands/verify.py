"""`imgq verify MODEL_DIR [DATA_DIR]`: check a bundle's served path without TensorFlow.

The checks are :class:`imgq.shared.bundle.ModelBundle`'s (manifest, model hash, input signature,
execution provider, golden set); with a labelled folder, also the served path's accuracy on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from imgq.shared.bundle import ModelBundle
from imgq.shared.decode import decode_image
from imgq.shared.errors import ImgqError
from imgq.shared.labelled import list_labelled_files

__all__ = ["verify_main"]

#: Files decoded and classified per model call when measuring accuracy on a folder.
_VERIFY_BATCH = 64


def _accuracy_on_folder(bundle: ModelBundle, data_dir: Path) -> int:
    """Print the served path's accuracy on a labelled folder; return the number of problems."""
    try:
        files, labels = list_labelled_files(data_dir)
    except (OSError, ValueError) as exc:
        print(f"FAIL  {exc}")
        return 1
    known = bundle.manifest.labels
    unknown = sorted(set(labels) - set(known))
    if unknown:
        print(
            f"FAIL  class folders {unknown} in {data_dir} are not labels of the model {list(known)}"
        )
        return 1
    truth = np.asarray([known.index(label) for label in labels])
    predicted = np.full(len(files), -1, dtype=np.int64)  # -1: the file could not be decoded
    bad = 0
    for start in range(0, len(files), _VERIFY_BATCH):
        chunk = files[start : start + _VERIFY_BATCH]
        images, rows = [], []
        for i, path in enumerate(chunk):
            try:
                images.append(decode_image(path.read_bytes()))
                rows.append(start + i)
            except ImgqError as exc:
                print(f"FAIL  {path}: {exc}")
                bad += 1
        if images:
            predicted[rows] = bundle.classify_images(images).argmax(axis=1)
    correct = predicted == truth
    print(f"ok    accuracy on {data_dir}: {correct.mean():.4f} ({int(correct.sum())}/{len(files)})")
    for k, label in enumerate(known):
        mask = truth == k
        if mask.any():
            print(f"        {label:<16} {correct[mask].mean():.4f} ({int(mask.sum())} files)")
    return bad


def verify_main(args: argparse.Namespace) -> int:
    """`imgq verify MODEL_DIR [DATA_DIR] [--device D]`: check a bundle without TensorFlow.

    Prints each check (manifest, model hash, input, provider, golden set) and, with ``DATA_DIR``
    (one sub-folder per class), the served path's accuracy on those files. Exit status 1 when any
    check fails.
    """
    try:
        bundle = ModelBundle.load(args.model_dir, device=args.device, check_golden=False)
        m = bundle.manifest
        print(
            f"ok    manifest {Path(args.model_dir) / 'manifest.json'}: {m.name}, "
            f"{len(m.labels)} labels {list(m.labels)}"
        )
        print(f"ok    {m.model_file} sha256 {m.model_sha256}")
        print(
            f"ok    input {m.input_name!r} {list(m.preprocess.input_shape)} matches the "
            f"preprocessing ({m.preprocess.height}x{m.preprocess.width} "
            f"{m.preprocess.color_order} {m.preprocess.resize_mode}/{m.preprocess.interpolation})"
        )
        print(f"ok    provider {bundle.provider}")
        golden = bundle.check_golden()
        print(
            f"ok    golden set: {golden['n']} images, top-1 agree {golden['top1_agree']}"
            f"/{golden['n']}, max |diff| {golden['max_abs_diff']:.2e}"
        )
        if m.parity:
            print(f"      parity at export: {m.parity}")
    except ImgqError as exc:
        print(f"FAIL  {exc}")
        return 1
    if args.data_dir and _accuracy_on_folder(bundle, Path(args.data_dir)):
        return 1
    return 0
