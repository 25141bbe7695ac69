"""A PACS as a dataset source: DICOMweb (PS3.18) QIDO-RS search and WADO-RS retrieval.

`dataset.source` spells the server and the search: `dicomweb+http://host:port/dicom-web?QUERY`
(or `dicomweb+https://`). QUERY is QIDO-RS matching: study-level keys (`ModalitiesInStudy=CT`,
`StudyDate=20240101-20241231`, `StudyInstanceUID=1.2.3,1.2.4`, `StudyDescription=...`) select the
studies; any other key (`Modality`, `SeriesDescription`, `SeriesInstanceUID`) filters the
instances of each study. `ModalitiesInStudy=CT` is searched as `Modality=CT` on the instances
(the CT images of any study): Orthanc 1.10 applies limit/offset before it matches
ModalitiesInStudy, so its later pages come back empty, and training wants those images anyway. `dataset.dicomweb` (core/config.py `DicomWebConfig`) holds the login, the
labels (a study/series UID table, or a tag mapped by `dataset.class_map`) and the limits.

`sync_instances` pages through the search (limit/offset), fetches each instance once into a cache
folder (bounded concurrency; retries with backoff on 5xx, resets and timeouts; a rerun fetches only
what is missing) and labels it. Its `fingerprint` is the dataset version: the sorted SOP Instance
UIDs with each instance's size, SHA-256 and label, so a study added to the PACS is a new version.
`stage_instances` lays the labelled files out as class folders for the DICOM ingest of the
download step (windowing, patient grouping, pseudonyms), the only place their tags are read.
Credentials are sent in the Authorization header and never logged or written; UIDs and tag values
never leave this module except through that ingest.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from tqdm import tqdm

from tumorflow.core.config import DicomWebConfig
from tumorflow.core.errors import ConfigError, DatasetError, SourceUnavailableError

logger = logging.getLogger(__name__)

SCHEME_PREFIX = "dicomweb+"
# QIDO-RS keys matched at the study level (PS3.18 table 10.6.1-5); any other key is passed to the
# instance search within each study.
STUDY_KEYS = frozenset(
    {
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
    }
)
_PAGING_KEYS = frozenset({"limit", "offset"})
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_DICOM_MULTIPART = 'multipart/related; type="application/dicom"'
_RETRIED_STATUS = frozenset({500, 502, 503, 504})
_DEFAULT_CACHE = "~/.cache/tumorflow/dicomweb"


def is_dicomweb_source(source: str) -> bool:
    """True for `dicomweb+http://...` and `dicomweb+https://...`."""
    return (
        source.strip().lower().startswith((f"{SCHEME_PREFIX}http://", f"{SCHEME_PREFIX}https://"))
    )


@dataclass(frozen=True)
class DicomWebQuery:
    """A parsed `dicomweb+` source: the DICOMweb root and the study and instance filters."""

    base_url: str
    study_filters: dict[str, str]
    instance_filters: dict[str, str]

    @classmethod
    def parse(cls, source: str) -> DicomWebQuery:
        if not is_dicomweb_source(source):
            raise ConfigError(
                f"{source!r} is not a DICOMweb source; write dicomweb+http://host:port/dicom-web?QUERY"
            )
        parts = urllib.parse.urlsplit(source.strip()[len(SCHEME_PREFIX) :])
        if parts.username or parts.password:
            raise ConfigError(
                "a dataset.source URL must not hold credentials (they would be written with it); "
                "set dataset.dicomweb.auth and give them by environment or credentials_file"
            )
        study, instance = {}, {}
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=False):
            if key in _PAGING_KEYS:
                raise ConfigError(f"{key} is set by dataset.dicomweb.page_size, not in the URL")
            if key == "ModalitiesInStudy":
                instance["Modality"] = value
            else:
                (study if key in STUDY_KEYS else instance)[key] = value
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        return cls(base, study, instance)


class PacsRefusedError(SourceUnavailableError):
    """The PACS answered with an error that retrying does not fix (HTTP `status`, a 4xx)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CredentialsRefusedError(PacsRefusedError):
    """The PACS refused the credentials (HTTP 401 or 403)."""


def authorization_header(
    config: DicomWebConfig, environ: Mapping[str, str], settings: str = "dataset.dicomweb"
) -> str | None:
    """The Authorization header value for `config.auth`, from `credentials_file` or `environ`;
    `settings` names the config section in messages."""
    if config.auth == "none":
        return None
    secret = ""
    if config.credentials_file:
        path = Path(config.credentials_file).expanduser()
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{settings}.credentials_file {path} cannot be read ({exc.strerror})"
            ) from None
    if config.auth == "bearer":
        token = secret or environ.get(config.token_env, "").strip()
        if not token:
            raise ConfigError(
                f"{settings}.auth is bearer but no token was given: set {config.token_env} "
                f"or {settings}.credentials_file"
            )
        return f"Bearer {token}"
    if secret:
        user, colon, password = secret.partition(":")
        if not colon:
            raise ConfigError(
                f"{settings}.credentials_file must hold `user:password` for basic auth"
            )
    else:
        user = environ.get(config.username_env, "")
        password = environ.get(config.password_env, "")
    if not user:
        raise ConfigError(
            f"{settings}.auth is basic but no user was given: set {config.username_env} and "
            f"{config.password_env}, or {settings}.credentials_file"
        )
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class DicomWebClient:
    """QIDO-RS and WADO-RS against one DICOMweb root, with retries on server errors.

    Thread-safe: each request is its own connection. The Authorization header is held here only
    and never appears in a message or a log line. `settings` names the config section that
    messages point to.
    """

    def __init__(
        self,
        base_url: str,
        authorization: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        settings: str = "dataset.dicomweb",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self._authorization = authorization
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"DicomWebClient({self.base_url!r})"

    def get(self, path: str, params: Mapping[str, str] | None = None, accept: str = "") -> bytes:
        """The body of GET base_url/path?params; retried on 5xx, resets and timeouts."""
        return self._request("GET", path, params, {"Accept": accept} if accept else {})[0]

    def store(self, instances: list[bytes]) -> dict:
        """STOW-RS: store Part 10 instances (POST studies); the server's dicom+json answer.
        Retrying is safe: a PACS keeps one object per SOP Instance UID."""
        boundary = f"tumorflow-{os.urandom(12).hex()}"
        body = b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
            for data in instances
        )
        headers = {
            "Accept": "application/dicom+json",
            "Content-Type": f'{_DICOM_MULTIPART}; boundary="{boundary}"',
        }
        answer, _ = self._request(
            "POST", "studies", None, headers, body + f"--{boundary}--".encode()
        )
        return json.loads(answer) if answer.strip() else {}

    def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: dict[str, str],
        data: bytes | None = None,
    ) -> tuple[bytes, Message]:
        """The body and headers of one request, retried on 5xx, resets and timeouts."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        if self._authorization:
            headers = {**headers, "Authorization": self._authorization}
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(url, data, headers, method=method)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read(), response.headers
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code in (401, 403):
                    raise CredentialsRefusedError(
                        f"the PACS at {self.base_url} refused the credentials (HTTP {exc.code}); "
                        f"check {self.settings}.auth and the user/password or token it reads",
                        exc.code,
                    ) from None
                if exc.code not in _RETRIED_STATUS:
                    raise PacsRefusedError(
                        f"the PACS at {self.base_url} answered HTTP {exc.code} to {method} /{path}; "
                        "check the URL and the query of "
                        f"{'dataset.source' if self.settings == 'dataset.dicomweb' else self.settings}",
                        exc.code,
                    ) from None
                problem = f"HTTP {exc.code}"
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                http.client.HTTPException,
            ) as exc:
                problem = type(getattr(exc, "reason", exc)).__name__
            if attempt < self.retries:
                delay = self.backoff * 2**attempt
                logger.info("PACS %s: %s, retry in %.1fs", self.base_url, problem, delay)
                self._sleep(delay)
        raise SourceUnavailableError(
            f"the PACS at {self.base_url} failed {self.retries + 1} times on {method} /{path} (last: "
            f"{problem}); check that it is running and reachable, or raise {self.settings}.retries"
        )

    def search(self, path: str, filters: Mapping[str, str], page_size: int) -> Iterator[dict]:
        """QIDO-RS results of `path` (studies, studies/UID/instances, ...), one page in memory
        at a time. A page shorter than asked ends the listing, unless the server warns that
        more results can be requested (PS3.18: a server may cap its pages below `limit`)."""
        offset = 0
        while True:
            body, headers = self._request(
                "GET",
                path,
                {**filters, "limit": str(page_size), "offset": str(offset)},
                {"Accept": "application/dicom+json"},
            )
            page = json.loads(body) if body.strip() else []
            del body
            yield from page
            if not page or (len(page) < page_size and not _more_results(headers)):
                return
            offset += len(page)

    def retrieve_instance(self, study: str, series: str, sop: str) -> bytes:
        """WADO-RS: the Part 10 bytes of one instance."""
        path = f"studies/{study}/series/{series}/instances/{sop}"
        return first_multipart_part(self.get(path, accept=_DICOM_MULTIPART))


def _more_results(headers: Message) -> bool:
    """Whether a QIDO-RS answer says it left results out (a `Warning: 299 ...` header: "There
    are additional results that can be requested")."""
    return any(
        "additional results" in warning.lower() for warning in headers.get_all("Warning") or []
    )


def first_multipart_part(body: bytes) -> bytes:
    """The content of the first part of a multipart/related body (a WADO-RS answer)."""
    if not body.startswith(b"--"):
        return body
    boundary = body[: body.index(b"\r\n")]
    start = body.index(b"\r\n\r\n") + 4
    end = body.index(b"\r\n" + boundary, start)
    return body[start:end]


def _value(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


@dataclass(frozen=True)
class InstanceRef:
    """Where one instance lives in the PACS."""

    study: str
    series: str
    sop: str


def search_instances(
    client: DicomWebClient, query: DicomWebQuery, page_size: int
) -> list[InstanceRef]:
    """Every instance of the studies the query matches (the instance filters applied), sorted."""
    found: dict[str, InstanceRef] = {}
    for study_item in client.search("studies", query.study_filters, page_size):
        study = _value(study_item, _STUDY_UID)
        for item in client.search(f"studies/{study}/instances", query.instance_filters, page_size):
            sop = _value(item, _SOP_UID)
            found[sop] = InstanceRef(study, _value(item, _SERIES_UID), sop)
    return sorted(found.values(), key=lambda ref: ref.sop)


def _cache_name(sop: str) -> str:
    return hashlib.sha256(sop.encode()).hexdigest()[:40] + ".dcm"


def fetch_instances(
    client: DicomWebClient,
    refs: list[InstanceRef],
    cache_dir: Path,
    concurrency: int,
) -> tuple[dict[str, Path], int]:
    """SOP UID -> cached file of every instance, fetching only the missing ones (at most
    `concurrency` at a time); and how many were fetched now. A file appears only when whole."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {ref.sop: cache_dir / _cache_name(ref.sop) for ref in refs}
    missing = [ref for ref in refs if not paths[ref.sop].exists()]

    def fetch(ref: InstanceRef) -> None:
        data = client.retrieve_instance(ref.study, ref.series, ref.sop)
        partial = paths[ref.sop].with_suffix(f".part{os.getpid()}")
        partial.write_bytes(data)
        partial.replace(paths[ref.sop])

    if missing:
        with (
            ThreadPoolExecutor(concurrency) as pool,
            tqdm(total=len(missing), desc="WADO-RS", unit="inst", disable=None) as bar,
        ):
            pending: set[Future] = set()
            for ref in missing:
                pending.add(pool.submit(fetch, ref))
                if len(pending) >= 2 * concurrency:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    _raise_first_failure(done, pending)
                    bar.update(len(done))
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                _raise_first_failure(done, pending)
                bar.update(len(done))
    return paths, len(missing)


def _raise_first_failure(done: set[Future], pending: set[Future]) -> None:
    """Re-raise the first failed retrieval, cancelling the ones not started."""
    for future in done:
        if future.exception() is not None:
            for other in pending:
                other.cancel()
            raise future.exception()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_label_table(config: DicomWebConfig) -> dict[str, str]:
    path = Path(config.label_table).expanduser()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = {config.label_uid_column, config.label_column} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(
                    f"the label table {path.name} has no column {', '.join(sorted(missing))}; "
                    "fix dataset.dicomweb.label_uid_column / label_column"
                )
            return {
                row[config.label_uid_column].strip(): row[config.label_column].strip()
                for row in reader
                if row[config.label_column].strip()
            }
    except OSError as exc:
        raise DatasetError(
            f"dataset.dicomweb.label_table {path} cannot be read ({exc.strerror})"
        ) from None


def _tag_label(path: Path, keyword: str) -> str:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return ""
    return str(dataset.get(keyword, "") or "").strip()


@dataclass(frozen=True)
class SyncedInstances:
    """The labelled instances a query gives now, each a file in the cache, and its fingerprint."""

    files: list[tuple[Path, str]]
    fingerprint: str
    detail: dict = field(default_factory=dict)


def sync_instances(
    source: str, config: DicomWebConfig, environ: Mapping[str, str] | None = None
) -> SyncedInstances:
    """Search the PACS, fetch what the cache lacks, label every instance (see the module
    docstring); instances without a label are left out and counted."""
    if bool(config.label_table) == bool(config.label_tag):
        raise ConfigError(
            "a dicomweb source needs exactly one of dataset.dicomweb.label_table (a study/series "
            "UID -> label CSV) or dataset.dicomweb.label_tag (a DICOM keyword)"
        )
    query = DicomWebQuery.parse(source)
    client = DicomWebClient(
        query.base_url,
        authorization_header(config, os.environ if environ is None else environ),
        timeout=config.timeout_seconds,
        retries=config.retries,
        backoff=config.backoff_seconds,
    )
    refs = search_instances(client, query, config.page_size)
    if not refs:
        raise DatasetError(f"the PACS search {source} matched no instances; check the query")
    cache_dir = Path(config.cache_dir or _DEFAULT_CACHE).expanduser()
    paths, fetched = fetch_instances(client, refs, cache_dir, config.concurrency)
    table = _read_label_table(config) if config.label_table else {}
    files, unlabelled = [], 0
    # the fingerprint is hashed as the lines are made: no second copy of the listing in memory
    digest, separator = hashlib.sha256(), b""
    for ref in refs:
        path = paths[ref.sop]
        if config.label_table:
            label = table.get(
                ref.study if config.label_uid_column == "StudyInstanceUID" else ref.series, ""
            )
        else:
            label = _tag_label(path, config.label_tag)
        if not label:
            unlabelled += 1
            continue
        files.append((path, label))
        line = f"{ref.sop}\t{path.stat().st_size}\t{_file_digest(path)}\t{label}"
        digest.update(separator + line.encode("utf-8", "surrogateescape"))
        separator = b"\n"
    if not files:
        raise DatasetError(
            f"none of the {len(refs)} instances of {source} has a label; check "
            "dataset.dicomweb.label_table or label_tag"
        )
    detail = {
        "kind": "dicomweb",
        "instances": len(files),
        "studies": len({ref.study for ref in refs}),
        "unlabelled": unlabelled,
    }
    logger.info(
        "PACS %s: %d instances of %d studies (%d fetched now, %d without a label)",
        query.base_url,
        len(refs),
        detail["studies"],
        fetched,
        unlabelled,
    )
    return SyncedInstances(files, "sha256:" + digest.hexdigest(), detail)


def stage_instances(synced: SyncedInstances, root: Path) -> Path:
    """Lay the instances out as `root/<label>/<name>.dcm` (hard links to the cache where the file
    system allows, else copies) for the download step's class-folder listing."""
    import shutil

    for path, label in synced.files:
        folder = root / (label.replace("/", "_").replace("\\", "_").lstrip(".") or "_")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
    return root
