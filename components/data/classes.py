"""Which folders are the classes of a fetched dataset, and the images under each: files with an
image extension (data/image_files.py) under a class folder, at any depth below it. Hidden files
and folders (`.DS_Store`, `._x.jpg`, `__MACOSX`) and files with other extensions are skipped and
counted in the log."""

from __future__ import annotations

import logging
from pathlib import Path

from tumorflow.components.data.image_files import is_hidden, list_images
from tumorflow.components.data.safe_names import escape_name, is_utf8
from tumorflow.core.config import DatasetConfig
from tumorflow.core.errors import DatasetError

logger = logging.getLogger(__name__)


def _dataset_base(root: Path, dataset: DatasetConfig) -> Path:
    """The folder holding the class (or split) folders.

    Descends through lone wrapper folders (an archive of `dataset/Training/...`) that hold folders
    themselves and are not named as a split or class folder.
    """
    subdir = dataset.subdir.strip("/")
    known = {name.lower() for name in (*dataset.split_dirs, *dataset.class_map)}
    current = root
    while True:
        if subdir and (current / subdir).is_dir():
            return current / subdir
        children = [c for c in current.iterdir() if not is_hidden(c.name)]
        lone = children[0] if len(children) == 1 and children[0].is_dir() else None
        if lone is not None and not any(c.is_dir() for c in lone.iterdir()):
            lone = None
        if not subdir and (lone is None or lone.name.lower() in known):
            return current
        if lone is None:
            raise DatasetError(
                f"the dataset has no folder {subdir!r} under {root}; fix dataset.subdir"
            )
        logger.info("descending into %s, the only folder of %s", lone.name, current)
        current = lone


def _class_folders(
    base: Path, dataset: DatasetConfig
) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """(class folder, label, source_split) for every labelled folder, and the skipped folders."""
    split_names = {name.lower(): split for name, split in dataset.split_dirs.items()}
    children = sorted(c for c in base.iterdir() if c.is_dir() and not is_hidden(c.name))
    containers = [
        (c, split_names[c.name.lower()]) for c in children if c.name.lower() in split_names
    ]
    if split_names and not containers:
        logger.warning(
            "none of the split folders %s is under %s: treating its folders as classes",
            sorted(dataset.split_dirs),
            base,
        )
    if not containers:
        containers = [(base, "")]
    class_map = {name.lower(): label for name, label in dataset.class_map.items()}
    folders, skipped = [], []
    for container, split in containers:
        for folder in sorted(
            c for c in container.iterdir() if c.is_dir() and not is_hidden(c.name)
        ):
            label = class_map.get(folder.name.lower()) if class_map else folder.name.lower()
            if label is not None and not is_utf8(label):
                label = escape_name(label)
            if label is None:
                logger.info(
                    "skipping folder %s: not in dataset.class_map", folder.relative_to(base)
                )
                skipped.append(folder.relative_to(base).as_posix())
                continue
            folders.append((folder, label, split))
    return folders, skipped


def labelled_images(
    root: Path, dataset: DatasetConfig
) -> tuple[list[tuple[Path, str, str, Path]], int, list[str]]:
    """(image, label, source_split, class folder) for every listed image under a fetched root,
    the number of non-image files skipped, and the folders skipped."""
    base = _dataset_base(root, dataset)
    folders, skipped_folders = _class_folders(base, dataset)
    if not folders:
        raise DatasetError(
            f"no class folders under {base}; check dataset.subdir, split_dirs and class_map"
        )
    listed, skipped_files = [], 0
    for folder, label, split in folders:
        images, skipped = list_images(folder)
        skipped_files += skipped
        listed.extend((image, label, split, folder) for image in images)
    return listed, skipped_files, skipped_folders
