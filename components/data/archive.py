"""Safe extraction of dataset archives (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz).

Every entry is checked before anything is written: an absolute name, a `..` part, a name that
resolves outside the target, a symlink or hardlink, a device or fifo, or a declared total size over
the cap (a zip bomb) refuses the whole archive with `UnsafeArchiveError`. Regular files are then
written one by one through our own code (never `extractall`), so nothing lands outside the target,
not even partially.

Entry names are data: a name that is not valid UTF-8 (a zip without the UTF-8 flag written by an
old tool, one flagged UTF-8 by a broken writer, a tar of a Windows share) is extracted under its raw bytes, as the file system would
hold it, so the download step's safe copies keep it reversibly; newlines, leading dashes, long
names and names differing only in case are extracted as they are. An entry that cannot be written
under its name (a path part over 255 bytes, a NUL byte, a second entry of the same name or of a
name differing only in case on a case-insensitive file system, a file where another entry needs a
folder) is left out with a reason in `ExtractedArchive.quarantined`, and extraction goes on.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import logging
import shutil
import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tumorflow.core.errors import SourceUnavailableError, UnsafeArchiveError

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_ENTRIES = 2_000_000
_CHUNK = 1 << 20
# Longest path part (bytes) the usual file systems (ext4, XFS, APFS, NTFS) hold.
MAX_PART_BYTES = 255
_ZIP_UTF8_FLAG = 0x800


@dataclass(frozen=True)
class _Entry:
    name: str
    is_dir: bool
    size: int
    member: zipfile.ZipInfo | tarfile.TarInfo


@dataclass(frozen=True)
class ExtractedArchive:
    """The files extracted and the entries left out: (entry name, reason), names as the file
    system would give them (undecodable bytes as surrogate escapes)."""

    files: list[Path]
    quarantined: list[tuple[str, str]] = field(default_factory=list)


class _Quarantined(Exception):
    """One entry cannot be written under its name; the message is the reason."""


def is_archive(path: Path) -> bool:
    """True when `path` is a file whose name ends like a supported archive."""
    name = Path(path).name.lower()
    return Path(path).is_file() and name.endswith(ARCHIVE_SUFFIXES)


def _safe_parts(name: str, archive: Path) -> tuple[str, ...]:
    """The path parts of an entry name, or `UnsafeArchiveError` if it could escape the target."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise UnsafeArchiveError(
            f"{archive.name}: entry {name!r} has an absolute path; refusing the archive"
        )
    parts = tuple(part for part in PurePosixPath(normalised).parts if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive.name}: entry {name!r} climbs out with '..'; refusing the archive"
        )
    return parts


def _is_utf8(info: zipfile.ZipInfo) -> bool:
    """True when a name zipfile read as cp437 (not flagged UTF-8) is valid UTF-8 bytes."""
    try:
        info.orig_filename.encode("cp437").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _zip_name(info: zipfile.ZipInfo) -> str:
    """An entry's name as the file system would hold it: UTF-8 when flagged or when its bytes are
    valid UTF-8, else its raw bytes (zipfile decoded them as cp437, which maps every byte)."""
    if info.flag_bits & _ZIP_UTF8_FLAG:
        return info.orig_filename
    return info.orig_filename.encode("cp437").decode("utf-8", "surrogateescape")


class _Utf8FlagCleared(io.RawIOBase):
    """A zip file read with the UTF-8 flag cleared at the given byte positions (the flags of
    central directory headers whose names are not UTF-8), so zipfile reads those names as bytes."""

    def __init__(self, file: BinaryIO, flag_positions: list[int]) -> None:
        super().__init__()
        self._file = file
        self._positions = sorted(flag_positions)

    def clear_flags(self, positions: Iterable[int]) -> None:
        """Clear the UTF-8 flag at these byte positions too."""
        self._positions = sorted({*self._positions, *positions})

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        start = self._file.tell()
        count = self._file.readinto(buffer)
        view = memoryview(buffer).cast("B")
        first = bisect.bisect_left(self._positions, start)
        for position in self._positions[first:]:
            if position >= start + count:
                break
            view[position - start] &= ~(_ZIP_UTF8_FLAG >> 8) & 0xFF
        return count


def _misflagged_names(path: Path) -> list[int]:
    """Positions of the flag byte holding the UTF-8 bit, in the central directory headers whose
    names claim UTF-8 but are not (a zip writer's bug zipfile cannot read past)."""
    with Path(path).open("rb") as handle:
        size = handle.seek(0, io.SEEK_END)
        tail_start = max(0, size - (1 << 16) - 22)
        handle.seek(tail_start)
        tail = handle.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0:
            return []
        if tail[end - 20 : end - 16] == b"PK\x06\x07":  # a zip64 end of central directory
            (zip64_end,) = struct.unpack_from("<Q", tail, end - 12)
            handle.seek(zip64_end)
            (directory_size,) = struct.unpack_from("<Q", handle.read(56), 40)
            start = zip64_end - directory_size
        else:
            (directory_size,) = struct.unpack_from("<I", tail, end + 12)
            start = tail_start + end - directory_size
        handle.seek(start)
        directory = handle.read(directory_size)
    positions, at = [], 0
    while directory[at : at + 4] == b"PK\x01\x02":
        (flags,) = struct.unpack_from("<H", directory, at + 8)
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", directory, at + 28)
        name = directory[at + 46 : at + 46 + name_length]
        if flags & _ZIP_UTF8_FLAG:
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                positions.append(start + at + 9)
        at += 46 + name_length + extra_length + comment_length
    return positions


@contextlib.contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    """The opened zip; one whose names are flagged UTF-8 but are not is read as raw bytes."""
    try:
        opened = zipfile.ZipFile(path)
    except UnicodeDecodeError:
        with (
            Path(path).open("rb") as raw,
            _Utf8FlagCleared(raw, _misflagged_names(path)) as fixed,
            zipfile.ZipFile(fixed) as opened,
        ):
            # zipfile checks each local header's name against the directory's, by its own flag
            fixed.clear_flags(
                info.header_offset + 7
                for info in opened.infolist()
                if not info.flag_bits & _ZIP_UTF8_FLAG and not _is_utf8(info)
            )
            yield opened
        return
    with opened:
        yield opened


def _zip_entries(archive: zipfile.ZipFile, path: Path) -> list[_Entry]:
    entries = []
    for info in archive.infolist():
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise UnsafeArchiveError(
                f"{path.name}: entry {info.filename!r} is a symlink; refusing the archive"
            )
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(
                f"{path.name}: entry {info.filename!r} is a special file; refusing the archive"
            )
        if info.flag_bits & 0x1:
            raise SourceUnavailableError(
                f"{path.name}: entry {info.filename!r} is encrypted; decrypt the archive first"
            )
        entries.append(_Entry(_zip_name(info), info.is_dir(), info.file_size, info))
    return entries


def _tar_entries(archive: tarfile.TarFile, path: Path) -> list[_Entry]:
    entries = []
    for member in archive:
        if member.issym() or member.islnk():
            raise UnsafeArchiveError(
                f"{path.name}: entry {member.name!r} is a {'symlink' if member.issym() else 'hardlink'}; "
                "refusing the archive"
            )
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(
                f"{path.name}: entry {member.name!r} is a device, fifo or special file; refusing the archive"
            )
        entries.append(_Entry(member.name, member.isdir(), member.size, member))
        if len(entries) > MAX_ENTRIES:
            raise UnsafeArchiveError(
                f"{path.name}: more than {MAX_ENTRIES} entries; refusing the archive"
            )
    return entries


def _check(entries: list[_Entry], archive: Path, target: Path, max_total_bytes: int) -> None:
    if len(entries) > MAX_ENTRIES:
        raise UnsafeArchiveError(
            f"{archive.name}: more than {MAX_ENTRIES} entries; refusing the archive"
        )
    total = 0
    root = target.resolve()
    for entry in entries:
        parts = _safe_parts(entry.name, archive)
        if (
            parts
            and "\0" not in entry.name
            and not root.joinpath(*parts).resolve().is_relative_to(root)
        ):
            raise UnsafeArchiveError(
                f"{archive.name}: entry {entry.name!r} resolves outside the target; refusing the archive"
            )
        total += max(entry.size, 0)
        if total > max_total_bytes:
            raise UnsafeArchiveError(
                f"{archive.name}: unpacks to more than {max_total_bytes / 2**30:.1f} GiB (a zip bomb?); "
                "raise dataset.max_archive_bytes if the archive is genuine"
            )


def _copy_bounded(source, out, limit: int, archive: Path, name: str) -> None:
    """Stream one member to the open file `out`, refusing it if it yields more bytes than it
    declared."""
    written = 0
    while chunk := source.read(_CHUNK):
        written += len(chunk)
        if written > limit:
            raise UnsafeArchiveError(
                f"{archive.name}: entry {name!r} is larger than it declares; refusing the archive"
            )
        out.write(chunk)


def extract_archive(archive: Path, target: Path, max_total_bytes: int) -> ExtractedArchive:
    """Validate every entry of `archive`, then extract its regular files under `target`.

    `target` must not exist yet or be empty. Returns the extracted files and the entries left out
    with their reasons. On any refusal nothing is written (validation happens first) and a
    partially written target is removed.
    """
    archive, target = Path(archive), Path(target)
    if target.exists() and any(target.iterdir()):
        raise SourceUnavailableError(f"extraction target {target} is not empty")
    try:
        if zipfile.is_zipfile(archive):
            with _open_zip(archive) as opened:
                entries = _zip_entries(opened, archive)
                _check(entries, archive, target, max_total_bytes)
                return _write_entries(entries, target, archive, lambda e: opened.open(e.member))
        with tarfile.open(archive, "r:*") as opened:
            entries = _tar_entries(opened, archive)
            _check(entries, archive, target, max_total_bytes)
            return _write_entries(entries, target, archive, lambda e: opened.extractfile(e.member))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise SourceUnavailableError(f"{archive} is not a readable archive: {exc}") from None


def _writable_parts(entry: _Entry, archive: Path) -> tuple[str, ...]:
    """The path parts an entry is written under; `_Quarantined` when the name cannot be one."""
    if "\0" in entry.name:
        raise _Quarantined("its name holds a NUL byte, which no file name can")
    parts = _safe_parts(entry.name, archive)
    long = [p for p in parts if len(p.encode("utf-8", "surrogateescape")) > MAX_PART_BYTES]
    if long:
        raise _Quarantined(
            f"a part of its name is {len(long[0].encode('utf-8', 'surrogateescape'))} bytes, "
            f"over the {MAX_PART_BYTES}-byte limit of file systems"
        )
    return parts


def _write_file(entry: _Entry, destination: Path, archive: Path, open_entry) -> None:
    """Write one regular file, never over an earlier one; `_Quarantined` when it cannot be."""
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _Quarantined("a folder of its path is a file of the archive") from None
    try:
        handle = destination.open("xb")
    except FileExistsError:
        raise _Quarantined(
            "an earlier entry has the same name (a duplicate, a folder, or a name differing "
            "only in case on a case-insensitive file system)"
        ) from None
    with handle, open_entry(entry) as source:
        _copy_bounded(source, handle, entry.size, archive, entry.name)


def _write_entries(
    entries: list[_Entry], target: Path, archive: Path, open_entry
) -> ExtractedArchive:
    target.mkdir(parents=True, exist_ok=True)
    written, quarantined = [], []
    try:
        for entry in entries:
            try:
                parts = _writable_parts(entry, archive)
                if not parts:
                    continue
                destination = target.joinpath(*parts)
                if entry.is_dir:
                    if not destination.is_dir():
                        destination.mkdir(parents=True, exist_ok=True)
                    continue
                _write_file(entry, destination, archive, open_entry)
            except (_Quarantined, FileExistsError, NotADirectoryError) as exc:
                reason = str(exc) if isinstance(exc, _Quarantined) else "its folder is a file"
                quarantined.append((entry.name, reason))
                logger.warning("%s: entry %r left out: %s", archive.name, entry.name, reason)
                continue
            written.append(destination)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    logger.info(
        "extracted %d files from %s (%d entries left out)",
        len(written),
        archive.name,
        len(quarantined),
    )
    return ExtractedArchive(written, quarantined)
