"""Safe archive extraction: hostile entries refuse the whole archive and write nothing anywhere."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from tumorflow.components.archive import extract_archive
from tumorflow.core.errors import SourceUnavailableError, UnsafeArchiveError

CAP = 10 * 2**20


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return path


def _zip_symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _assert_nothing_written(tmp_path: Path, archive: Path) -> None:
    """Only the archive itself is left: no target folder, no escaped file."""
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]
    assert not Path("/tmp/tumorflow-absolute-escape.txt").exists()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_clean_tar_extracts_every_file(tmp_path: Path, suffix: str) -> None:
    archive = _tar(
        tmp_path / f"ok{suffix}",
        [(_file("data/Cyst/a.jpg"), b"abc"), (_file("data/Normal/b.jpg"), b"de")],
    )
    written = extract_archive(archive, tmp_path / "out", CAP)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "data/Cyst/a.jpg",
        "data/Normal/b.jpg",
    ]
    assert (tmp_path / "out/data/Cyst/a.jpg").read_bytes() == b"abc"


def test_a_clean_zip_extracts_every_file(tmp_path: Path) -> None:
    archive = _zip(
        tmp_path / "ok.zip", [("Cyst/a.jpg", b"abc"), ("Cyst/", b""), ("./Normal/b.jpg", b"x")]
    )
    extract_archive(archive, tmp_path / "out", CAP)
    assert (tmp_path / "out/Cyst/a.jpg").read_bytes() == b"abc"
    assert (tmp_path / "out/Normal/b.jpg").read_bytes() == b"x"


@pytest.mark.parametrize(
    "members",
    [
        [(_file("good.jpg"), b"ok"), (_file("../escape.txt"), b"pwned")],
        [(_file("good.jpg"), b"ok"), (_file("a/../../escape.txt"), b"pwned")],
        [(_file("good.jpg"), b"ok"), (_file("/tmp/tumorflow-absolute-escape.txt"), b"pwned")],
        [(_file("good.jpg"), b"ok"), (_link("link", "/etc/passwd", tarfile.SYMTYPE), None)],
        [(_file("good.jpg"), b"ok"), (_link("hard", "/etc/passwd", tarfile.LNKTYPE), None)],
        [(_file("good.jpg"), b"ok"), (_link("fifo", "", tarfile.FIFOTYPE), None)],
        [(_file("good.jpg"), b"ok"), (_link("dev", "", tarfile.CHRTYPE), None)],
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "fifo", "device"],
)
def test_hostile_tar_entries_refuse_the_whole_archive(tmp_path: Path, members) -> None:
    archive = _tar(tmp_path / "evil.tar", members)
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="refusing the archive"):
        extract_archive(archive, target, CAP)
    _assert_nothing_written(tmp_path, archive)


@pytest.mark.parametrize(
    "entries",
    [
        [("good.jpg", b"ok"), ("../escape.txt", b"pwned")],
        [("good.jpg", b"ok"), ("/tmp/tumorflow-absolute-escape.txt", b"pwned")],
        [("good.jpg", b"ok"), ("..\\escape.txt", b"pwned")],
        [("good.jpg", b"ok"), (_zip_symlink("link"), b"/etc/passwd")],
    ],
    ids=["dotdot", "absolute", "backslash-dotdot", "symlink"],
)
def test_hostile_zip_entries_refuse_the_whole_archive(tmp_path: Path, entries) -> None:
    archive = _zip(tmp_path / "evil.zip", entries)
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="refusing the archive"):
        extract_archive(archive, target, CAP)
    _assert_nothing_written(tmp_path, archive)


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bomb:
        for index in range(3):
            bomb.writestr(f"zeros-{index}.bin", b"\0" * (8 * 2**20))
    assert archive.stat().st_size < 200_000
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        extract_archive(archive, tmp_path / "out", max_total_bytes=16 * 2**20)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_an_archive_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "data.tar.gz"
    fake.write_text("not really gzip")
    with pytest.raises(SourceUnavailableError, match="not a readable archive"):
        extract_archive(fake, tmp_path / "out", CAP)
