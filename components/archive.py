"""Safe extraction of dataset archives (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz).

Every entry is checked before anything is written: an absolute name, a `..` part, a name that
resolves outside the target, a symlink or hardlink, a device or fifo, or a declared total size over
the cap (a zip bomb) refuses the whole archive with `UnsafeArchiveError`. Regular files are then
written one by one through our own code (never `extractall`), so nothing lands outside the target,
not even partially.
"""

from __future__ import annotations

import logging
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tumorflow.core.errors import SourceUnavailableError, UnsafeArchiveError

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_ENTRIES = 2_000_000
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Entry:
    name: str
    is_dir: bool
    size: int
    member: zipfile.ZipInfo | tarfile.TarInfo


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
        entries.append(_Entry(info.filename, info.is_dir(), info.file_size, info))
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
        if parts and not root.joinpath(*parts).resolve().is_relative_to(root):
            raise UnsafeArchiveError(
                f"{archive.name}: entry {entry.name!r} resolves outside the target; refusing the archive"
            )
        total += max(entry.size, 0)
        if total > max_total_bytes:
            raise UnsafeArchiveError(
                f"{archive.name}: unpacks to more than {max_total_bytes / 2**30:.1f} GiB (a zip bomb?); "
                "raise dataset.max_archive_bytes if the archive is genuine"
            )


def _copy_bounded(source, destination: Path, limit: int, archive: Path, name: str) -> None:
    """Stream one member to disk, refusing it if it yields more bytes than it declared."""
    written = 0
    with destination.open("wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise UnsafeArchiveError(
                    f"{archive.name}: entry {name!r} is larger than it declares; refusing the archive"
                )
            out.write(chunk)


def extract_archive(archive: Path, target: Path, max_total_bytes: int) -> list[Path]:
    """Validate every entry of `archive`, then extract its regular files under `target`.

    `target` must not exist yet or be empty. Returns the extracted files. On any refusal nothing
    is written (validation happens first) and a partially written target is removed.
    """
    archive, target = Path(archive), Path(target)
    if target.exists() and any(target.iterdir()):
        raise SourceUnavailableError(f"extraction target {target} is not empty")
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as opened:
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


def _write_entries(entries: list[_Entry], target: Path, archive: Path, open_entry) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for entry in entries:
            parts = _safe_parts(entry.name, archive)
            if not parts:
                continue
            destination = target.joinpath(*parts)
            if entry.is_dir:
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open_entry(entry) as source:
                _copy_bounded(source, destination, entry.size, archive, entry.name)
            written.append(destination)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    logger.info("extracted %d files from %s", len(written), archive.name)
    return written
