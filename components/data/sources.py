"""Where a dataset comes from: `phantom` (the synthetic generator), a local folder, a local
archive (.zip, .tar, .tar.gz, .tgz, ... extracted safely), `kaggle:<owner>/<slug>[/versions/N]`
(kagglehub), `gs://bucket/prefix` (the storage layer) and `dicomweb+http(s)://...?QUERY` (a PACS,
components/data/dicomweb.py): each fetched into a local folder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tumorflow.components.data import archive, dicomweb
from tumorflow.components.data.manifest import ARCHIVE_QUARANTINE, sha256_file
from tumorflow.components.data.phantom import generate_phantom
from tumorflow.components.data.safe_names import escape_name
from tumorflow.core import storage
from tumorflow.core.config import DatasetConfig
from tumorflow.core.errors import SourceUnavailableError

_UNSAFE_CHARS = re.compile(r"[^\w.+-]+", re.ASCII)
_KAGGLE_HANDLE = re.compile(r"^[\w.-]+/[\w.-]+(/versions/(\d+))?$")


@dataclass(frozen=True)
class Fetched:
    root: Path
    resolved: str
    version: str | None
    extra: dict = field(default_factory=dict)


def fetch_kaggle(handle: str) -> Fetched:
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
    return Fetched(Path(resolved), str(resolved), version)


def fetch(source: str, staging: Path, dataset: DatasetConfig) -> Fetched:
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
        return Fetched(root, "phantom", None, {"phantom": phantom.model_dump()})
    if source.startswith("kaggle:"):
        return fetch_kaggle(source.removeprefix("kaggle:").strip("/"))
    if dicomweb.is_dicomweb_source(source):
        synced = dicomweb.sync_instances(source, dataset.dicomweb)
        root = dicomweb.stage_instances(synced, staging / "dicomweb")
        return Fetched(
            root, source, None, {"dicomweb": {**synced.detail, "fingerprint": synced.fingerprint}}
        )
    if storage.is_remote(source):
        storage.download_tree(source, staging / "gcs")
        return Fetched(staging / "gcs", source, None)
    path = Path(source).expanduser()
    if path.is_dir():
        return Fetched(path, str(path.resolve()), None)
    if archive.is_archive(path):
        extracted = archive.extract_archive(path, staging / "archive", dataset.max_archive_bytes)
        extra: dict = {"sha256": sha256_file(path)}
        if extracted.quarantined:
            extra[ARCHIVE_QUARANTINE] = [
                [escape_name(name), reason] for name, reason in extracted.quarantined
            ]
        return Fetched(staging / "archive", str(path.resolve()), None, extra)
    raise unusable_source(source, path)


def unusable_source(source: str, path: Path) -> SourceUnavailableError:
    if path.exists():
        return SourceUnavailableError(
            f"{path} is neither a folder nor a supported archive ({', '.join(archive.ARCHIVE_SUFFIXES)})"
        )
    return SourceUnavailableError(
        f"dataset source {source!r} does not exist; give phantom, a folder, an archive, "
        "kaggle:<owner>/<slug>[/versions/N] or gs://bucket/prefix"
    )
