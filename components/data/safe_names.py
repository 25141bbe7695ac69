"""Safe copy names for any name a folder can hold. A path part that is not valid UTF-8, holds a
control character (a newline), starts with a dash or is longer than `MAX_NAME_BYTES` is copied under a
safe name (`<readable stem>~<hash of the original><suffix>`), and so is a name that differs only
in case from one already copied (a case-insensitive file system would merge them); the original
is kept, percent-encoded and reversible (`original_name`), in the manifest's `original_path`
column, which is empty where the copy kept its name."""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath
from urllib.parse import quote, unquote_to_bytes

from tumorflow.components.data.image_files import IMAGE_EXTENSIONS

MANIFEST_COLUMNS = ("path", "label", "sha256", "bytes", "source_split", "original_path")
# Longest path part kept as it is (bytes): room left under the usual 255 for derived names.
MAX_NAME_BYTES = 200


MAX_NAME_BYTES = 200
_UNSAFE_CHARS = re.compile(r"[^\w.+-]+", re.ASCII)


def _raw_bytes(name: str) -> bytes:
    """The bytes of a file name as the file system gave them (undecodable bytes included)."""
    return name.encode("utf-8", "surrogateescape")


def escape_name(name: str) -> str:
    """A printable, reversible (`original_name`) spelling of any file name or path."""
    return quote(_raw_bytes(name), safe="/ !#$&'()*+,;=@[]^`{}~-._")


def original_name(escaped: str) -> str:
    """The name `escape_name` spelled (undecodable bytes as surrogate escapes, as os gives)."""
    return unquote_to_bytes(escaped).decode("utf-8", "surrogateescape")


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_safe_part(part: str) -> bool:
    return (
        is_utf8(part)
        and len(part.encode("utf-8")) <= MAX_NAME_BYTES
        and not part.startswith("-")
        and not any(ord(char) < 32 or ord(char) == 127 for char in part)
    )


def _renamed_part(part: str) -> str:
    """A short ASCII name for a path part, unique to its original bytes."""
    tag = hashlib.sha256(_raw_bytes(part)).hexdigest()[:10]
    suffix = PurePosixPath(part).suffix
    suffix = suffix.lower() if suffix.lower() in IMAGE_EXTENSIONS else ""
    stem = part[: len(part) - len(suffix)] if suffix else part
    readable = _UNSAFE_CHARS.sub("_", stem.encode("ascii", "replace").decode()).lstrip("-._")
    return f"{readable[:60]}~{tag}{suffix}"


def safe_copy_paths(relatives: list[str]) -> list[tuple[str, str]]:
    """(path to copy to, escaped original or "") for each source path, in the given order.

    Hostile parts are renamed (see the module docstring); of paths that differ only in case the
    first keeps its name and the others are renamed, so no two copies can collide.
    """
    taken: set[str] = set()
    result = []
    for relative in relatives:
        *folders, name = PurePosixPath(relative).parts
        safe = [part if _is_safe_part(part) else _renamed_part(part) for part in folders]
        candidate = name if _is_safe_part(name) else _renamed_part(name)
        if "/".join([*safe, candidate]).casefold() in taken:
            candidate = _renamed_part(name)
        path = "/".join([*safe, candidate])
        taken.add(path.casefold())
        result.append((path, "" if path == relative else escape_name(relative)))
    return result
