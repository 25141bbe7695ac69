"""The one storage layer: local paths and `gs://bucket/prefix` URIs behind the same functions.

Remote URIs go through the real google-cloud-storage client. It honours the standard
`STORAGE_EMULATOR_HOST` variable itself (the tests point it at gcp-storage-emulator); this module
reads no environment variables. Every remote call has a short timeout and a bounded retry, and
unreachable GCS, missing buckets or missing credentials raise `SourceUnavailableError` with a
message that says what to do instead of a stack trace after minutes of retries.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tumorflow.core.errors import SourceUnavailableError

if TYPE_CHECKING:
    from google.cloud.storage import Client

logger = logging.getLogger(__name__)

SCHEME = "gs://"
# (connect, read) seconds per HTTP request, and the total time retries may take.
REQUEST_TIMEOUT = (5.0, 60.0)
RETRY_DEADLINE_S = 20.0

_HINT = (
    "check the bucket name and your network; authenticate with "
    "`gcloud auth application-default login` (or GOOGLE_APPLICATION_CREDENTIALS), or point "
    "STORAGE_EMULATOR_HOST at a GCS emulator"
)


def is_remote(uri: str | Path) -> bool:
    """True for `gs://bucket/...` URIs, False for local paths."""
    return str(uri).startswith(SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/a/b` -> (`bucket`, `a/b`); the prefix has no leading or trailing slash."""
    if not is_remote(uri):
        raise SourceUnavailableError(f"{uri!r} is not a gs://bucket/prefix URI")
    bucket, _, prefix = uri[len(SCHEME) :].partition("/")
    if not bucket:
        raise SourceUnavailableError(f"{uri!r} names no bucket; write gs://<bucket>/<prefix>")
    return bucket, prefix.strip("/")


def join(uri: str | Path, *parts: str) -> str:
    """Append path parts to a local path or a gs:// URI."""
    if is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri).joinpath(*parts))


def make_client(project: str | None = None) -> Client:
    """A google-cloud-storage client (the emulator is used when STORAGE_EMULATOR_HOST is set)."""
    import google.auth.exceptions
    from google.cloud import storage

    try:
        return storage.Client(project=project)
    except (google.auth.exceptions.GoogleAuthError, OSError) as exc:
        raise SourceUnavailableError(
            f"cannot create a Google Cloud Storage client ({exc}); {_HINT}"
        ) from None


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(RETRY_DEADLINE_S)


@contextmanager
def _gcs_errors(action: str, uri: str) -> Iterator[None]:
    """Turn the client's network, auth and 404 errors into `SourceUnavailableError`."""
    import google.api_core.exceptions as api
    import google.auth.exceptions
    import requests

    try:
        yield
    except api.NotFound:
        raise SourceUnavailableError(
            f"cannot {action} {uri}: bucket or object not found; {_HINT}"
        ) from None
    except api.Forbidden as exc:
        raise SourceUnavailableError(
            f"cannot {action} {uri}: permission denied ({exc.message}); {_HINT}"
        ) from None
    except (
        api.GoogleAPIError,
        google.auth.exceptions.GoogleAuthError,
        requests.exceptions.RequestException,
    ) as exc:
        raise SourceUnavailableError(f"cannot {action} {uri}: {str(exc)[:300]}; {_HINT}") from None


def _client(client: Client | None) -> Client:
    return client if client is not None else make_client()


def list_files(uri: str | Path, client: Client | None = None) -> list[str]:
    """Relative POSIX paths of every file under a folder or prefix, sorted."""
    if not is_remote(uri):
        root = Path(uri)
        if not root.is_dir():
            raise SourceUnavailableError(f"{root} is not a folder")
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    bucket, prefix = split_uri(str(uri))
    gcs = _client(client)
    base = f"{prefix}/" if prefix else ""
    with _gcs_errors("list", str(uri)):
        names = [
            blob.name[len(base) :]
            for blob in gcs.list_blobs(bucket, prefix=base, timeout=REQUEST_TIMEOUT, retry=_retry())
            if not blob.name.endswith("/")
        ]
    return sorted(names)


def list_generations(uri: str, client: Client | None = None) -> dict[str, int]:
    """Relative name -> GCS generation of every object under a gs:// prefix: what identifies the
    prefix's content without reading it (a rewritten object gets a new generation)."""
    bucket, prefix = split_uri(str(uri))
    gcs = _client(client)
    base = f"{prefix}/" if prefix else ""
    with _gcs_errors("list", str(uri)):
        return {
            blob.name[len(base) :]: int(blob.generation)
            for blob in gcs.list_blobs(bucket, prefix=base, timeout=REQUEST_TIMEOUT, retry=_retry())
            if not blob.name.endswith("/")
        }


def exists(uri: str | Path, client: Client | None = None) -> bool:
    """True when a local path exists, or a gs:// URI names an object or a non-empty prefix."""
    if not is_remote(uri):
        return Path(uri).exists()
    bucket, name = split_uri(str(uri))
    gcs = _client(client)
    with _gcs_errors("check", str(uri)):
        if not name:
            return gcs.bucket(bucket).exists(timeout=REQUEST_TIMEOUT, retry=_retry())
        if gcs.bucket(bucket).blob(name).exists(timeout=REQUEST_TIMEOUT, retry=_retry()):
            return True
        blobs = gcs.list_blobs(
            bucket, prefix=f"{name}/", max_results=1, timeout=REQUEST_TIMEOUT, retry=_retry()
        )
        return any(True for _ in blobs)


def _safe_local_target(local_dir: Path, relative: str) -> Path:
    """Where an object lands under `local_dir`; refuses names that would escape it."""
    parts = PurePosixPath(relative).parts
    if (
        not parts
        or any(part in ("..", "") for part in parts)
        or PurePosixPath(relative).is_absolute()
    ):
        raise SourceUnavailableError(
            f"refusing to download object name {relative!r}: it escapes the target"
        )
    return local_dir.joinpath(*parts)


def download_file(uri: str | Path, local_path: Path, client: Client | None = None) -> Path:
    """Copy one file (local or gs://) to `local_path`; return it."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(uri):
        if not Path(uri).is_file():
            raise SourceUnavailableError(f"{uri} is not a file")
        shutil.copyfile(uri, local_path)
        return local_path
    bucket, name = split_uri(str(uri))
    gcs = _client(client)
    with _gcs_errors("download", str(uri)):
        gcs.bucket(bucket).blob(name).download_to_filename(
            str(local_path), timeout=REQUEST_TIMEOUT, retry=_retry()
        )
    return local_path


def download_tree(uri: str | Path, local_dir: Path, client: Client | None = None) -> list[Path]:
    """Copy every file under a folder or gs:// prefix into `local_dir`, keeping relative paths."""
    local_dir = Path(local_dir)
    if not is_remote(uri):
        names = list_files(uri)
        shutil.copytree(uri, local_dir, dirs_exist_ok=True, symlinks=False)
        return [local_dir / name for name in names]
    gcs = _client(client)
    names = list_files(uri, client=gcs)
    if not names:
        raise SourceUnavailableError(f"{uri} holds no files; check the prefix")
    logger.info("downloading %d objects from %s", len(names), uri)
    paths = []
    for name in names:
        target = _safe_local_target(local_dir, name)
        paths.append(download_file(join(uri, name), target, client=gcs))
    return paths


def upload_file(local_path: Path, uri: str | Path, client: Client | None = None) -> str:
    """Copy one local file to a local path or gs:// URI; return the destination."""
    local_path = Path(local_path)
    if not local_path.is_file():
        raise SourceUnavailableError(f"{local_path} is not a file")
    if not is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, uri)
        return str(uri)
    bucket, name = split_uri(str(uri))
    if not name:
        raise SourceUnavailableError(f"{uri} names a bucket, not an object")
    gcs = _client(client)
    with _gcs_errors("upload to", str(uri)):
        gcs.bucket(bucket).blob(name).upload_from_filename(
            str(local_path), timeout=REQUEST_TIMEOUT, retry=_retry()
        )
    return str(uri)


def upload_tree(local_dir: Path, uri: str | Path, client: Client | None = None) -> list[str]:
    """Copy every file under a local folder to a local folder or gs:// prefix; return destinations."""
    names = list_files(local_dir)
    gcs = _client(client) if is_remote(uri) else None
    return [upload_file(Path(local_dir) / name, join(uri, name), client=gcs) for name in names]


class ConcurrentWriteError(SourceUnavailableError):
    """Another writer changed the object since it was read (a GCS generation precondition)."""


def read_versioned(uri: str | Path, client: Client | None = None) -> tuple[bytes | None, int]:
    """An object's bytes and its generation (0 and None when it does not exist).

    For local files the generation is the modification time in nanoseconds; writers of local
    files serialise with a lock instead (`write_versioned` ignores it there).
    """
    if not is_remote(uri):
        path = Path(uri)
        if not path.is_file():
            return None, 0
        return path.read_bytes(), path.stat().st_mtime_ns
    import google.api_core.exceptions as api

    bucket, name = split_uri(str(uri))
    gcs = _client(client)
    blob = gcs.bucket(bucket).blob(name)
    with _gcs_errors("read", str(uri)):
        try:
            blob.reload(timeout=REQUEST_TIMEOUT, retry=_retry())
        except api.NotFound:
            return None, 0
        generation = int(blob.generation)
        data = blob.download_as_bytes(
            if_generation_match=generation, timeout=REQUEST_TIMEOUT, retry=_retry()
        )
    return data, generation


def write_versioned(
    uri: str | Path, data: bytes, generation: int, client: Client | None = None
) -> None:
    """Replace an object atomically, only if it is still at `generation` (0: it must not exist).

    gs://: a generation precondition, so two writers that read the same version cannot both
    win; the loser gets `ConcurrentWriteError` and reads again. A conditional write is safe to
    retry, so throttling (429) and server errors are retried. Local: written beside the target
    and renamed over it, so a reader never sees half a file.
    """
    if not is_remote(uri):
        import os
        import tempfile

        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "wb", dir=target.parent, delete=False, prefix=f".{target.name}.", suffix=".tmp"
        ) as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)
        return
    import google.api_core.exceptions as api

    bucket, name = split_uri(str(uri))
    gcs = _client(client)
    blob = gcs.bucket(bucket).blob(name)
    with _gcs_errors("write", str(uri)):
        try:
            blob.upload_from_string(
                data, if_generation_match=generation, timeout=REQUEST_TIMEOUT, retry=_retry()
            )
        except api.PreconditionFailed:
            raise ConcurrentWriteError(
                f"{uri} was changed by another writer (generation is no longer {generation})"
            ) from None
