"""The dicomweb source against a real PACS: Orthanc with DICOMweb on loopback, credentials on."""

from __future__ import annotations

import base64
import logging
import uuid
from pathlib import Path

import pytest
from dicom_fixtures import FAKE_PHI
from pacs import FlakyProxy, OrthancServer, store_ct_study

from tumorflow.components.data import dicomweb
from tumorflow.components.data.dataset_version import resolve_dataset_version
from tumorflow.components.data.dicom import read_slice_table
from tumorflow.components.data.download import download_dataset
from tumorflow.components.data.validate import validate_and_split
from tumorflow.core.config import DatasetConfig, DicomConfig, DicomWebConfig, SplitConfig
from tumorflow.core.errors import ConfigError, SourceUnavailableError

SALT = DicomConfig(pseudonym_salt="pacs-test-salt")
CLASS_MAP = {"lesion ct": "tumor", "clear ct": "normal"}
LEVEL = {"tumor": 220.0, "normal": 40.0}


def store_study(
    server: OrthancServer,
    tmp_path: Path,
    tag: str,
    patient: int,
    label: str,
    slices: int = 3,
) -> str:
    """Store one CT study (one series of `slices` 64x64 slices) of a patient with PHI-like tags;
    `tag` (the StudyDescription) keeps each test's studies apart. Returns the Study UID."""
    return store_ct_study(
        server,
        tmp_path / "made",
        patient=patient,
        level_hu=LEVEL[label],
        study_description=tag,
        series_description=next(k for k, v in CLASS_MAP.items() if v == label).upper(),
        slices=slices,
    )


def pacs_dataset(
    url: str, tag: str, tmp_path: Path, class_map: dict[str, str] = CLASS_MAP, **dicomweb_settings
) -> DatasetConfig:
    settings = {
        "auth": "basic",
        "label_tag": "SeriesDescription",
        "cache_dir": str(tmp_path / "cache"),
        "backoff_seconds": 0.01,
        **dicomweb_settings,
    }
    return DatasetConfig(
        source=f"dicomweb+{url}/dicom-web?ModalitiesInStudy=CT&StudyDescription={tag}",
        class_map=class_map,
        dicom=SALT,
        dicomweb=DicomWebConfig(**settings),
    )


@pytest.fixture()
def login(orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PACS credentials in the environment variables the source reads by default."""
    config = DicomWebConfig()
    monkeypatch.setenv(config.username_env, orthanc.username)
    monkeypatch.setenv(config.password_env, orthanc.password)


@pytest.fixture()
def tag() -> str:
    return f"tf-{uuid.uuid4().hex[:10]}"


def test_pacs_studies_become_labelled_patient_grouped_images_without_phi(
    orthanc: OrthancServer,
    login: None,
    tag: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    studies = [
        store_study(orthanc, tmp_path, tag, patient, "tumor" if patient % 2 else "normal")
        for patient in range(6)
    ]
    dataset = pacs_dataset(orthanc.url, tag, tmp_path)
    raw = download_dataset(dataset.source, tmp_path / "out" / "raw", dataset)
    assert raw.label_counts == {"normal": 9, "tumor": 9}
    assert raw.source["dicomweb"]["studies"] == 6
    split = validate_and_split(
        tmp_path / "out" / "raw",
        tmp_path / "out" / "split",
        SplitConfig(
            phash_max_distance=0, min_test_per_class=1, val_fraction=0.2, test_fraction=0.2
        ),
    )
    assert split.quarantined == []
    assert split.grouping["patients"] == 6
    slices = read_slice_table(tmp_path / "out" / "raw")
    assert len(slices) == 18
    assert {row["modality"] for row in slices.values()} == {"CT"}
    needles = [
        *FAKE_PHI.values(),
        orthanc.password,
        base64.b64encode(f"{orthanc.username}:{orthanc.password}".encode()).decode(),
        *studies,
    ]
    assert not [n for n in needles if n in caplog.text]
    written = list((tmp_path / "out").rglob("*"))
    assert len(written) > 18
    for path in written:
        assert not any(n in str(path) for n in needles), path
        if path.is_file():
            data = path.read_bytes()
            assert not [n for n in needles if n.encode() in data], path


def test_a_study_added_to_the_pacs_is_a_new_dataset_version(
    orthanc: OrthancServer, login: None, tag: str, tmp_path: Path
) -> None:
    studies = [store_study(orthanc, tmp_path, tag, p, "normal", slices=2) for p in range(2)]
    table = tmp_path / "labels.csv"
    table.write_text(f"StudyInstanceUID,label\n{studies[0]},normal\n{studies[1]},tumor\n")
    dataset = pacs_dataset(
        orthanc.url, tag, tmp_path, class_map={}, label_tag="", label_table=str(table)
    )
    first = resolve_dataset_version(dataset)
    assert first.detail == {"kind": "dicomweb", "instances": 4, "studies": 2, "unlabelled": 0}
    assert resolve_dataset_version(dataset).fingerprint == first.fingerprint
    added = store_study(orthanc, tmp_path, tag, 7, "tumor", slices=2)
    # a study the label table does not name is not training data: the same version
    unlabelled = resolve_dataset_version(dataset)
    assert unlabelled.detail["unlabelled"] == 2
    assert unlabelled.fingerprint == first.fingerprint
    table.write_text(table.read_text() + f"{added},tumor\n")
    second = resolve_dataset_version(dataset)
    assert second.detail["instances"] == 6
    assert second.fingerprint != first.fingerprint
    raw = download_dataset(dataset.source, tmp_path / "raw", dataset, second)
    assert raw.dataset_version == second.fingerprint
    assert raw.label_counts == {"normal": 2, "tumor": 4}


def test_search_pages_through_more_instances_than_one_page_and_fetches_each_once(
    orthanc: OrthancServer, login: None, tag: str, tmp_path: Path
) -> None:
    for patient in range(3):
        store_study(orthanc, tmp_path, tag, patient, "tumor", slices=3)
    proxy = FlakyProxy(orthanc.url, failures=0)
    try:
        dataset = pacs_dataset(proxy.url, tag, tmp_path, page_size=2, concurrency=3)
        version = resolve_dataset_version(dataset)
        assert version.detail["instances"] == 9
        searches = [p for p in proxy.paths if "limit=2" in p]
        # 3 studies: 2 study pages; 9 instances in 3 studies of 3: 2 pages each
        assert len(searches) == 2 + 3 * 2
        retrievals = [p for p in proxy.paths if "/series/" in p]
        assert len(retrievals) == 9
        raw = download_dataset(dataset.source, tmp_path / "raw", dataset, version)
        assert len(raw.rows) == 9
        assert len([p for p in proxy.paths if "/series/" in p]) == 9
    finally:
        proxy.close()


def test_server_errors_are_retried_with_backoff(
    orthanc: OrthancServer, login: None, tag: str, tmp_path: Path
) -> None:
    store_study(orthanc, tmp_path, tag, 1, "normal", slices=2)
    proxy = FlakyProxy(orthanc.url, failures=3)
    try:
        dataset = pacs_dataset(proxy.url, tag, tmp_path, retries=3)
        assert resolve_dataset_version(dataset).detail["instances"] == 2
        assert proxy.requests == 3 + 1 + 1 + 2
    finally:
        proxy.close()
    proxy = FlakyProxy(orthanc.url, failures=100)
    try:
        dataset = pacs_dataset(proxy.url, tag, tmp_path, retries=2)
        with pytest.raises(SourceUnavailableError, match=r"failed 3 times .*HTTP 503"):
            resolve_dataset_version(dataset)
        assert proxy.requests == 3
    finally:
        proxy.close()


def test_wrong_credentials_give_one_clear_error(
    orthanc: OrthancServer, tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pacs-login"
    secret.write_text(f"{orthanc.username}:not-the-password\n")
    proxy = FlakyProxy(orthanc.url, failures=0)
    try:
        dataset = pacs_dataset(proxy.url, tag, tmp_path, credentials_file=str(secret))
        with pytest.raises(SourceUnavailableError) as raised:
            download_dataset(dataset.source, tmp_path / "raw", dataset)
        assert proxy.requests == 1
    finally:
        proxy.close()
    message = str(raised.value)
    assert "refused the credentials (HTTP 401)" in message
    assert "not-the-password" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_a_bearer_token_and_a_secret_file_give_the_authorization_header(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc.def\n")
    assert (
        dicomweb.authorization_header(
            DicomWebConfig(auth="bearer", credentials_file=str(token)), {}
        )
        == "Bearer abc.def"
    )
    assert (
        dicomweb.authorization_header(DicomWebConfig(auth="bearer"), {"TUMORFLOW_PACS_TOKEN": "t"})
        == "Bearer t"
    )
    basic = dicomweb.authorization_header(
        DicomWebConfig(auth="basic"),
        {"TUMORFLOW_PACS_USERNAME": "u", "TUMORFLOW_PACS_PASSWORD": "p"},
    )
    assert base64.b64decode(basic.removeprefix("Basic ")) == b"u:p"
    with pytest.raises(ConfigError, match="TUMORFLOW_PACS_TOKEN"):
        dicomweb.authorization_header(DicomWebConfig(auth="bearer"), {})


def test_the_source_url_splits_into_study_and_instance_filters_and_refuses_credentials() -> None:
    query = dicomweb.DicomWebQuery.parse(
        "dicomweb+https://pacs.example/dicom-web/?ModalitiesInStudy=CT&StudyDate=20240101-20241231"
        "&SeriesDescription=AX*"
    )
    assert query.base_url == "https://pacs.example/dicom-web"
    assert query.study_filters == {"StudyDate": "20240101-20241231"}
    assert query.instance_filters == {"Modality": "CT", "SeriesDescription": "AX*"}
    with pytest.raises(ConfigError, match="must not hold credentials"):
        dicomweb.DicomWebQuery.parse("dicomweb+http://u:secret@pacs/dicom-web")
