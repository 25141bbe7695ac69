"""Download step: fetch a dataset from any supported source into the "Raw dataset" folder.

Sources: `phantom` (the synthetic generator), a local folder, a local archive (.zip, .tar,
.tar.gz, .tgz, ... extracted safely), `kaggle:<owner>/<slug>[/versions/N]` (kagglehub) and
`gs://bucket/prefix` (the storage layer) and `dicomweb+http(s)://...?QUERY` (a PACS,
components/data/dicomweb.py). The output (docs/artifacts.md "Raw dataset"):
`files/<relative path>`, `manifest.csv` (path,label,sha256,bytes,source_split,original_path)
and `source.json`.

Any name a folder can hold is kept as data. A path part that is not valid UTF-8, holds a control
character (a newline), starts with a dash or is longer than `MAX_NAME_BYTES` is copied under a
safe name (`<readable stem>~<hash of the original><suffix>`), and so is a name that differs only
in case from one already copied (a case-insensitive file system would merge them); the original
is kept, percent-encoded and reversible (`original_name`), in the `original_path` column, which is
empty where the copy kept its name.

Which files are listed: files with an image extension (see `IMAGE_EXTENSIONS`) under a class
folder, at any depth below it. Hidden files and folders (`.DS_Store`, `._x.jpg`, `__MACOSX`) and
files with other extensions are skipped and counted in the log. A broken file with an image
extension is still listed: validation quarantines it with a reason. DICOM files (`.dcm`, or
extension-less files of a series folder) are decoded by components/data/dicom.py into pseudonymous
8-bit PNG slices, with their metadata in `slices.csv`; an undecodable one becomes a note that
validation quarantines with the reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote_to_bytes

from tqdm import tqdm

from tumorflow.components.data import archive, dicom, dicomweb, metadata_table
from tumorflow.components.data.image_files import IMAGE_EXTENSIONS, is_hidden, list_images
from tumorflow.components.data.phantom import generate_phantom
from tumorflow.core import storage
from tumorflow.core.artifacts import MANIFEST_CSV, SOURCE_JSON
from tumorflow.core.artifacts import RAW_FILES as FILES
from tumorflow.core.config import DatasetConfig
from tumorflow.core.errors import DatasetError, SourceUnavailableError

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "sha256", "bytes", "source_split", "original_path")
# Longest path part kept as it is (bytes): room left under the usual 255 for derived names.
MAX_NAME_BYTES = 200
_UNSAFE_CHARS = re.compile(r"[^\w.+-]+", re.ASCII)
_KAGGLE_HANDLE = re.compile(r"^[\w.-]+/[\w.-]+(/versions/(\d+))?$")
_STAGING = ".staging"
# source.json key: archive entries that could not be extracted, [escaped name, reason] each;
# validation lists them in its quarantine report.
ARCHIVE_QUARANTINE = "archive_quarantine"


@dataclass(frozen=True)
class ManifestRow:
    """One listed image of the raw dataset."""

    path: str
    label: str
    sha256: str
    bytes: int
    source_split: str
    # The path as the source named it, percent-encoded, when the copy was renamed; else "".
    original_path: str = ""


@dataclass(frozen=True)
class DownloadResult:
    """What `download_dataset` wrote: the raw dataset folder and a summary of it."""

    output_dir: Path
    rows: list[ManifestRow]
    source: dict
    skipped_folders: list[str] = field(default_factory=list)

    @property
    def label_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(row.label for row in self.rows).items()))

    @property
    def dataset_version(self) -> str:
        return self.source.get("dataset_version", "")

    def summary(self) -> dict:
        """Flat key/values for the pipeline artifact's metadata."""
        return {
            "images": len(self.rows),
            "labels": self.label_counts,
            "source": self.source.get("source", ""),
            "version": self.source.get("version") or "",
            "dataset_version": self.dataset_version,
        }


@dataclass(frozen=True)
class DatasetVersion:
    """What a source holds now, as one content fingerprint (docs/caching.md).

    `fingerprint` changes exactly when the images or their labels change; `source` is what the
    download fetches (a Kaggle handle pinned to the resolved version); `detail` says how the
    fingerprint was made.
    """

    fingerprint: str
    source: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Fetched:
    root: Path
    resolved: str
    version: str | None
    extra: dict = field(default_factory=dict)


def _digest(lines: list[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def manifest_fingerprint(rows: list[ManifestRow]) -> str:
    """The dataset version of a manifest: its (original) paths, labels, splits and SHA-256s."""
    return _digest(
        sorted(
            f"{r.original_path or r.path}\t{r.label}\t{r.source_split}\t{r.sha256}" for r in rows
        )
    )


def _raw_bytes(name: str) -> bytes:
    """The bytes of a file name as the file system gave them (undecodable bytes included)."""
    return name.encode("utf-8", "surrogateescape")


def escape_name(name: str) -> str:
    """A printable, reversible (`original_name`) spelling of any file name or path."""
    return quote(_raw_bytes(name), safe="/ !#$&'()*+,;=@[]^`{}~-._")


def original_name(escaped: str) -> str:
    """The name `escape_name` spelled (undecodable bytes as surrogate escapes, as os gives)."""
    return unquote_to_bytes(escaped).decode("utf-8", "surrogateescape")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_safe_part(part: str) -> bool:
    return (
        _is_utf8(part)
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


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_kaggle(handle: str) -> _Fetched:
    import kagglehub
    import kagglehub.exceptions as kaggle_errors
    import requests

    match = _KAGGLE_HANDLE.match(handle)
    if not match:
        raise SourceUnavailableError(
            f"kaggle:{handle} is not a dataset handle; write kaggle:<owner>/<slug>[/versions/N]"
        )
    try:
        resolved = kagglehub.dataset_download(handle)
    except requests.exceptions.RequestException as exc:
        if isinstance(exc, kaggle_errors.KaggleApiHTTPError):
            raise SourceUnavailableError(
                f"Kaggle refused kaggle:{handle} ({exc}); check the handle and version, and your "
                "credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY)"
            ) from None
        raise SourceUnavailableError(
            f"Kaggle is unreachable ({type(exc).__name__}). Download kaggle:{handle} on a machine with "
            f"internet (`kagglehub.dataset_download('{handle}')`) and give that folder or a .zip of it as "
            "SOURCE, or copy its kagglehub cache here and set KAGGLEHUB_CACHE (pin /versions/N so the "
            "cache is used without asking Kaggle)"
        ) from None
    except (kaggle_errors.CredentialError, kaggle_errors.UnauthenticatedError) as exc:
        raise SourceUnavailableError(
            f"Kaggle needs credentials for kaggle:{handle} ({exc}); put them in ~/.kaggle/kaggle.json "
            "or KAGGLE_USERNAME/KAGGLE_KEY"
        ) from None
    except (
        kaggle_errors.NotFoundError,
        kaggle_errors.BackendError,
        kaggle_errors.DataCorruptionError,
    ) as exc:
        raise SourceUnavailableError(f"kagglehub could not fetch kaggle:{handle}: {exc}") from None
    version = match.group(2)
    if version is None:
        found = re.search(r"versions[/\\](\d+)", str(resolved))
        version = found.group(1) if found else None
    return _Fetched(Path(resolved), str(resolved), version)


def _fetch(source: str, staging: Path, dataset: DatasetConfig) -> _Fetched:
    """Bring the source to a local folder (in `staging` when it must be made or copied)."""
    if source == "phantom":
        phantom = dataset.phantom
        root = generate_phantom(
            staging / "phantom",
            phantom.per_class,
            phantom.size,
            phantom.seed,
            phantom.slices_per_patient,
            phantom.corrupt,
            phantom.noise_scale,
            phantom.lesion_scale,
        )
        return _Fetched(root, "phantom", None, {"phantom": phantom.model_dump()})
    if source.startswith("kaggle:"):
        return _fetch_kaggle(source.removeprefix("kaggle:").strip("/"))
    if dicomweb.is_dicomweb_source(source):
        synced = dicomweb.sync_instances(source, dataset.dicomweb)
        root = dicomweb.stage_instances(synced, staging / "dicomweb")
        return _Fetched(
            root, source, None, {"dicomweb": {**synced.detail, "fingerprint": synced.fingerprint}}
        )
    if storage.is_remote(source):
        storage.download_tree(source, staging / "gcs")
        return _Fetched(staging / "gcs", source, None)
    path = Path(source).expanduser()
    if path.is_dir():
        return _Fetched(path, str(path.resolve()), None)
    if archive.is_archive(path):
        extracted = archive.extract_archive(path, staging / "archive", dataset.max_archive_bytes)
        extra: dict = {"sha256": sha256_file(path)}
        if extracted.quarantined:
            extra[ARCHIVE_QUARANTINE] = [
                [escape_name(name), reason] for name, reason in extracted.quarantined
            ]
        return _Fetched(staging / "archive", str(path.resolve()), None, extra)
    raise _unusable_source(source, path)


def _unusable_source(source: str, path: Path) -> SourceUnavailableError:
    if path.exists():
        return SourceUnavailableError(
            f"{path} is neither a folder nor a supported archive ({', '.join(archive.ARCHIVE_SUFFIXES)})"
        )
    return SourceUnavailableError(
        f"dataset source {source!r} does not exist; give phantom, a folder, an archive, "
        "kaggle:<owner>/<slug>[/versions/N] or gs://bucket/prefix"
    )


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
            if label is not None and not _is_utf8(label):
                label = escape_name(label)
            if label is None:
                logger.info(
                    "skipping folder %s: not in dataset.class_map", folder.relative_to(base)
                )
                skipped.append(folder.relative_to(base).as_posix())
                continue
            folders.append((folder, label, split))
    return folders, skipped


def _labelled_images(
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


def resolve_dataset_version(dataset: DatasetConfig) -> DatasetVersion:
    """Fingerprint what `dataset.source` holds now, without copying it.

    phantom: its generator settings. A folder: the manifest it would give (paths, labels and
    SHA-256s). An archive: its SHA-256. gs://: every object's name and generation. Kaggle: the
    resolved version (an unpinned handle is pinned to it, so the download fetches just that).
    """
    source = dataset.source.strip()
    if source == "phantom":
        settings = json.dumps(dataset.phantom.model_dump(), sort_keys=True)
        return DatasetVersion(_digest([f"phantom\t{settings}"]), source, {"kind": "phantom"})
    if source.startswith("kaggle:"):
        fetched = _fetch_kaggle(source.removeprefix("kaggle:").strip("/"))
        if fetched.version is None:
            raise SourceUnavailableError(
                f"kagglehub did not say which version of {source} it fetched; pin one: "
                f"{source.rstrip('/')}/versions/N"
            )
        handle = source.removeprefix("kaggle:").strip("/").split("/versions/")[0]
        pinned = f"kaggle:{handle}/versions/{fetched.version}"
        return DatasetVersion(
            _digest([pinned]), pinned, {"kind": "kaggle", "version": fetched.version}
        )
    if dicomweb.is_dicomweb_source(source):
        synced = dicomweb.sync_instances(source, dataset.dicomweb)
        return DatasetVersion(synced.fingerprint, source, synced.detail)
    if storage.is_remote(source):
        generations = storage.list_generations(source)
        if not generations:
            raise SourceUnavailableError(f"{source} holds no objects")
        return DatasetVersion(
            _digest(sorted(f"{name}\t{gen}" for name, gen in generations.items())),
            source,
            {"kind": "gcs", "objects": len(generations)},
        )
    path = Path(source).expanduser()
    if path.is_dir():
        listed, _, _ = _labelled_images(path, dataset)
        names = safe_copy_paths([image.relative_to(path).as_posix() for image, *_ in listed])
        rows = [
            ManifestRow(copy_path, label, sha256_file(image), 0, split, original)
            for (image, label, split, _), (copy_path, original) in zip(
                tqdm(listed, desc="fingerprint", unit="img", disable=None, leave=False),
                names,
                strict=True,
            )
        ]
        return DatasetVersion(
            manifest_fingerprint(rows), source, {"kind": "folder", "images": len(rows)}
        )
    if archive.is_archive(path):
        return DatasetVersion(
            "sha256:" + sha256_file(path), source, {"kind": "archive", "bytes": path.stat().st_size}
        )
    raise _unusable_source(source, path)


def _prepare_output(output_dir: Path) -> None:
    """Make `output_dir` an empty raw dataset folder, replacing an earlier raw dataset only."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / MANIFEST_CSV).exists():
            raise SourceUnavailableError(
                f"{output_dir} is not empty and is not a raw dataset; choose a new folder"
            )
        for name in (FILES, _STAGING):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in (MANIFEST_CSV, SOURCE_JSON, dicom.SLICES_CSV):
            (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for row in rows:
            writer.writerow(
                [row.path, row.label, row.sha256, row.bytes, row.source_split, row.original_path]
            )


def read_manifest(raw_dir: Path) -> list[ManifestRow]:
    """The rows of a raw dataset's manifest.csv."""
    path = Path(raw_dir) / MANIFEST_CSV
    if not path.exists():
        raise DatasetError(
            f"{raw_dir} is not a raw dataset: {MANIFEST_CSV} is missing; run the download step"
        )
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_COLUMNS) - {"original_path"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path} lacks the columns {sorted(missing)}")
        return [
            ManifestRow(
                r["path"],
                r["label"],
                r["sha256"],
                int(r["bytes"]),
                r["source_split"] or "",
                r.get("original_path") or "",
            )
            for r in reader
        ]


def download_dataset(
    source: str,
    output_dir: Path,
    dataset: DatasetConfig,
    expected_version: DatasetVersion | None = None,
) -> DownloadResult:
    """Fetch `source`, copy its labelled images to `output_dir/files/`, write the manifest.

    The result's `dataset_version` is `expected_version` (what the pipeline's resolve step saw,
    and keyed the cache on) when given, else the manifest's fingerprint. For a folder source the
    two must agree: a folder that changed between the two steps is refused, not half-read.
    """
    output_dir = Path(output_dir)
    _prepare_output(output_dir)
    staging = output_dir / _STAGING
    try:
        fetched = _fetch(source.strip(), staging, dataset)
        listed, skipped_files, skipped_folders = _labelled_images(fetched.root, dataset)
        rows, source_rows, originals = [], [], []
        files_dir = output_dir / FILES
        dicoms = None
        names = safe_copy_paths(
            [image.relative_to(fetched.root).as_posix() for image, *_ in listed]
        )
        for (image, label, split, folder), (relative, original) in zip(
            tqdm(listed, desc="copy images", unit="img", disable=None, leave=False),
            names,
            strict=True,
        ):
            class_folder = folder.relative_to(fetched.root).as_posix()
            if dicom.is_dicom_file(image):
                dicoms = dicoms or dicom.DicomIngest(dataset.dicom, files_dir)
                source_rows.append(
                    ManifestRow(relative, label, sha256_file(image), 0, split, original)
                )
                for written in dicoms.add(image, class_folder, relative):
                    originals.append((written, relative, class_folder))
                    target = files_dir / written
                    rows.append(
                        ManifestRow(
                            written, label, sha256_file(target), target.stat().st_size, split
                        )
                    )
                continue
            target = files_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if staging in image.parents:
                image.replace(target)
            else:
                shutil.copyfile(image, target)
            rows.append(
                ManifestRow(
                    relative, label, sha256_file(target), target.stat().st_size, split, original
                )
            )
            source_rows.append(rows[-1])
            originals.append((relative, relative, class_folder))
        metadata_table.write_slices(
            output_dir,
            metadata_table.merge_slice_records(
                fetched.root, dataset, originals, dicoms.records if dicoms else []
            ),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not rows:
        raise DatasetError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under the class folders of {source}"
        )
    rows.sort(key=lambda row: row.path)
    content = manifest_fingerprint(rows)
    if (
        expected_version is not None
        and expected_version.detail.get("kind") == "folder"
        and expected_version.fingerprint != manifest_fingerprint(source_rows)
    ):
        raise DatasetError(
            f"{source} changed while it was being downloaded (dataset version "
            f"{expected_version.fingerprint[:19]} became {content[:19]}); run again"
        )
    pacs_version = fetched.extra.get("dicomweb", {}).get("fingerprint")
    if (
        expected_version is not None
        and pacs_version
        and pacs_version != expected_version.fingerprint
    ):
        raise DatasetError(
            f"the PACS search {source} changed while it was being downloaded (dataset version "
            f"{expected_version.fingerprint[:19]} became {pacs_version[:19]}); run again"
        )
    write_manifest(rows, output_dir / MANIFEST_CSV)
    source_info = {
        "source": source,
        "resolved": fetched.resolved,
        "version": fetched.version,
        "dataset_version": expected_version.fingerprint if expected_version else content,
        "manifest_sha256": content,
        "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **fetched.extra,
    }
    (output_dir / SOURCE_JSON).write_text(json.dumps(source_info, indent=2) + "\n")
    result = DownloadResult(output_dir, rows, source_info, skipped_folders)
    logger.info(
        "raw dataset: %d images %s from %s (%d non-image files skipped) -> %s",
        len(rows),
        result.label_counts,
        source,
        skipped_files,
        output_dir,
    )
    return result
