"""Safe archive extraction: hostile entries refuse the whole archive and write nothing anywhere;
hostile names are kept as data or left out with a reason, and extraction goes on."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import HOSTILE_NAMES, image_bytes, write_hostile_name_corpus

from tumorflow.components.data.archive import extract_archive
from tumorflow.components.data.download import download_dataset
from tumorflow.components.data.manifest import read_manifest
from tumorflow.components.data.safe_names import original_name
from tumorflow.components.data.validate import validate_and_split
from tumorflow.core.config import DatasetConfig, SplitConfig
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
    written = extract_archive(archive, tmp_path / "out", CAP).files
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


def _zip_raw(path: Path, entries: list[tuple[bytes, bytes]], utf8_flag: bool = False) -> Path:
    """A zip whose entry names are exactly the given bytes, with or without the UTF-8 flag, as
    old PACS exports and Windows tools write them (zipfile itself would re-encode them)."""
    placeholders = [
        f"@{index:03d}".ljust(len(raw), "#").encode() for index, (raw, _) in enumerate(entries)
    ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for placeholder, (_, data) in zip(placeholders, entries, strict=True):
            archive.writestr(placeholder.decode(), data)
    data = bytearray(buffer.getvalue())
    if utf8_flag:  # bit 11 of the general purpose flags, in the local and the central headers
        for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            start = data.find(signature)
            while start >= 0:
                data[start + flags_at + 1] |= 0x08
                start = data.find(signature, start + 1)
    data = bytes(data)
    for placeholder, (raw, _) in zip(placeholders, entries, strict=True):
        assert len(placeholder) == len(raw) and data.count(placeholder) == 2
        data = data.replace(placeholder, raw)
    path.write_bytes(data)
    return path


def _files_on_disk(root: Path) -> dict[bytes, bytes]:
    """Relative path (raw bytes, as the file system holds it) -> content, of every file."""
    found = {}
    for folder, _, names in os.walk(bytes(root)):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, bytes(root))] = handle.read()
    return found


def _hostile_entries() -> list[tuple[bytes, bytes]]:
    return [(b"Tumor/" + name, b"image %d" % index) for index, name in enumerate(HOSTILE_NAMES)]


def test_zip_names_that_are_not_utf8_are_extracted_under_their_raw_bytes(tmp_path: Path) -> None:
    entries = _hostile_entries()
    archive = _zip_raw(tmp_path / "pacs.zip", entries)
    result = extract_archive(archive, tmp_path / "out", CAP)
    assert result.quarantined == []
    assert _files_on_disk(tmp_path / "out") == dict(entries)


def test_zip_names_flagged_utf8_keep_their_characters(tmp_path: Path) -> None:
    entries = [(name, data) for name, data in _hostile_entries() if _is_utf8(name)]
    assert len(entries) >= 8
    archive = _zip_raw(tmp_path / "flagged.zip", entries, utf8_flag=True)
    extract_archive(archive, tmp_path / "out", CAP)
    assert _files_on_disk(tmp_path / "out") == dict(entries)


def test_zip_names_flagged_utf8_that_are_not_are_extracted_under_their_raw_bytes(
    tmp_path: Path,
) -> None:
    entries = [(b"Tumor/bad_\xff_name.png", b"bad"), (b"Tumor/ok_\xc3\xa9.png", b"ok")]
    archive = _zip_raw(tmp_path / "broken-writer.zip", entries, utf8_flag=True)
    with pytest.raises(UnicodeDecodeError):
        zipfile.ZipFile(archive)  # what the standard library makes of it
    extract_archive(archive, tmp_path / "out", CAP)
    assert _files_on_disk(tmp_path / "out") == dict(entries)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_tar_names_that_are_not_utf8_are_extracted_under_their_raw_bytes(
    tmp_path: Path, fmt: int
) -> None:
    entries = _hostile_entries()
    archive = tmp_path / "share.tar.gz"
    with tarfile.open(archive, "w:gz", format=fmt, errors="surrogateescape") as opened:
        for raw, data in entries:
            info = tarfile.TarInfo(raw.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            opened.addfile(info, io.BytesIO(data))
    result = extract_archive(archive, tmp_path / "out", CAP)
    assert result.quarantined == []
    assert _files_on_disk(tmp_path / "out") == dict(entries)


def test_entries_that_cannot_be_written_are_left_out_with_a_reason(tmp_path: Path) -> None:
    archive = tmp_path / "mixed.tar"
    members = [
        (_file("Tumor/kept.png"), b"kept"),
        (_file("Tumor/" + "x" * 300 + ".png"), b"too long"),
        (_file("Tumor/same.png"), b"first"),
        (_file("Tumor/same.png"), b"second"),
        (_file("Tumor/plain"), b"a file"),
        (_file("Tumor/plain/inside.png"), b"needs a folder"),
        (_file("Tumor/last.png"), b"last"),
    ]
    _tar(archive, members)
    result = extract_archive(archive, tmp_path / "out", CAP)
    assert _files_on_disk(tmp_path / "out") == {
        b"Tumor/kept.png": b"kept",
        b"Tumor/same.png": b"first",
        b"Tumor/plain": b"a file",
        b"Tumor/last.png": b"last",
    }
    reasons = dict(result.quarantined)
    assert len(result.quarantined) == 3
    assert "255-byte limit" in reasons["Tumor/" + "x" * 300 + ".png"]
    assert "same name" in reasons["Tumor/same.png"]
    assert "is a file" in reasons["Tumor/plain/inside.png"]


def test_a_zip_name_with_a_nul_byte_is_left_out_and_the_rest_extracted(tmp_path: Path) -> None:
    archive = _zip_raw(
        tmp_path / "nul.zip", [(b"Tumor/a\0b.png", b"nul"), (b"Tumor/ok.png", b"ok")]
    )
    result = extract_archive(archive, tmp_path / "out", CAP)
    assert _files_on_disk(tmp_path / "out") == {b"Tumor/ok.png": b"ok"}
    assert [reason for _, reason in result.quarantined] == [
        "its name holds a NUL byte, which no file name can"
    ]


@pytest.mark.parametrize(
    "hostile",
    [b"../\xff_escape.png", b"/tmp/tumorflow-absolute-\xfe.png", b"Tumor/\xff/../../up.png"],
    ids=["dotdot", "absolute", "nested-dotdot"],
)
def test_traversal_with_undecodable_names_still_refuses_the_archive_in_one_line(
    tmp_path: Path, hostile: bytes
) -> None:
    archive = _zip_raw(tmp_path / "evil.zip", [(b"Tumor/good.png", b"ok"), (hostile, b"pwned")])
    with pytest.raises(UnsafeArchiveError, match="refusing the archive") as raised:
        extract_archive(archive, tmp_path / "out", CAP)
    message = str(raised.value)
    assert "\n" not in message and message.isprintable()
    message.encode("utf-8")  # printable on any terminal: no lone surrogates
    _assert_nothing_written(tmp_path, archive)


def test_a_hostile_name_archive_goes_through_download_and_validate(tmp_path: Path) -> None:
    corpus = write_hostile_name_corpus(tmp_path / "corpus", per_class=10)
    archive = tmp_path / "hostile.tar.gz"
    with tarfile.open(archive, "w:gz") as opened:
        opened.add(tmp_path / "corpus", arcname="dataset")
        for index, raw in enumerate((b"tumor/" + b"y" * 300 + b".png", b"tumor/dup.png")):
            data = image_bytes(seed=index, size=32)
            info = tarfile.TarInfo("dataset/" + raw.decode())
            info.size = len(data)
            opened.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("dataset/tumor/dup.png")
        info.size = 3
        opened.addfile(info, io.BytesIO(b"two"))
    raw = download_dataset(str(archive), tmp_path / "raw", DatasetConfig())
    rows = read_manifest(tmp_path / "raw")
    listed = {
        (original_name(row.original_path) if row.original_path else row.path).encode(
            "utf-8", "surrogateescape"
        )
        for row in rows
    }
    for label, names in corpus.items():
        for name in names:
            assert b"dataset/" + label.encode() + b"/" + name in listed, name
    assert len(rows) == 2 * (10 + len(HOSTILE_NAMES)) + 1
    assert raw.label_counts == {"normal": 10 + len(HOSTILE_NAMES), "tumor": 11 + len(HOSTILE_NAMES)}
    split = validate_and_split(
        tmp_path / "raw", tmp_path / "split", SplitConfig(min_test_per_class=1, seed=3)
    )
    reasons = dict(split.quarantined)
    assert "archive entry not extracted" in reasons["dataset/tumor/" + "y" * 300 + ".png"]
    assert "same name" in reasons["dataset/tumor/dup.png"]
    assert sum(sum(c.values()) for c in split.counts.values()) == len(rows)


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
