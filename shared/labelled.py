"""A labelled image folder: one sub-folder per class, as Keras' ``image_dataset_from_directory``
reads it. Training reads it (``imgq train``) and so does ``imgq verify`` in a worker's
environment, hence here in the shared layer: standard library only.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "list_labelled_files"]

#: File name endings taken as images (case-insensitive); other files are ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_labelled_files(data_dir: str | Path) -> tuple[list[Path], list[str]]:
    """The image files of a folder with one sub-folder per class, and each file's class name.

    The layout is Keras' ``image_dataset_from_directory`` one: ``data_dir/<class>/<image>``.
    Classes and files are sorted by name, so the order (and a seeded split) is reproducible.

    Raises:
        ValueError: ``data_dir`` is not a folder, or a class folder holds no image.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected one sub-folder of images per class")
    files: list[Path] = []
    labels: list[str] = []
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; put each class's images in its own")
    for folder in classes:
        found = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not found:
            raise ValueError(
                f"class folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                "remove it or add images"
            )
        files += found
        labels += [folder.name] * len(found)
    return files, labels
