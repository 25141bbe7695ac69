"""Which files count as images, for the dataset download and the drift check alike."""

from __future__ import annotations

from pathlib import Path

from tumorflow.components.data.image_files import list_images
from tumorflow.components.monitoring.features import image_files


def _tree(root: Path) -> None:
    for name in (
        "tumor/a.PNG",
        "tumor/deep/b.jpg",
        "tumor/.c.png",
        "tumor/.thumbs/d.png",
        "__MACOSX/tumor/e.png",
        "tumor/notes.txt",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not really an image")


def test_images_at_any_depth_count_and_hidden_files_and_folders_do_not(tmp_path):
    _tree(tmp_path)

    images, skipped = list_images(tmp_path)

    assert [p.relative_to(tmp_path).as_posix() for p in images] == [
        "tumor/a.PNG",
        "tumor/deep/b.jpg",
    ]
    assert skipped == 1  # notes.txt


def test_the_drift_check_reads_the_same_files_as_the_download(tmp_path):
    _tree(tmp_path)

    assert image_files(tmp_path) == list_images(tmp_path)[0]
