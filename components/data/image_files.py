"""Which files are images: the one extension list and the one hidden-file rule that downloading a
dataset and reading recent images for a drift check share."""

from __future__ import annotations

from pathlib import Path

from tumorflow.components.data import dicom

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# The largest image decoded, by the size its header declares: a 250 KB PNG can declare 16000 x
# 16000 and take seconds and gigabytes to decode. The validate step quarantines larger ones; the
# input pipeline and the serving signature refuse them.
MAX_IMAGE_PIXELS = 64_000_000


def is_hidden(name: str) -> bool:
    """A dot file or folder, or macOS's `__MACOSX` archive folder: never an image of the data."""
    return name.startswith(".") or name == "__MACOSX"


def is_image(path: Path) -> bool:
    """An image-extension file (any case) or a DICOM file (by content)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS or dicom.is_dicom_file(path)


def list_images(folder: Path) -> tuple[list[Path], int]:
    """The image and DICOM files under `folder` (any depth, none inside a hidden folder), sorted,
    and how many other visible files were skipped."""
    images, skipped = [], 0
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder).parts
        if not path.is_file() or any(is_hidden(part) for part in relative):
            continue
        if is_image(path):
            images.append(path)
        else:
            skipped += 1
    return images, skipped


def describe() -> str:
    """The accepted files, for messages: the extensions, then DICOM."""
    return f"{', '.join(sorted(IMAGE_EXTENSIONS))}, DICOM"
