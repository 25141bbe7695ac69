"""Training data from a PACS, end to end: the whole DAG under kfp.local with a QIDO-RS query
against a real Orthanc (DICOMweb, credentials on) as its source, tracked by a real MLflow server.

Sixteen patients from two sites, their CT studies written with pydicom with fake PHI in their
tags. Run 1 trains; run 2 with the same query finds the same dataset version and takes the
training from the cache; a study added to the PACS makes run 3 a new version that trains again.
Then every file the runs wrote, the MLflow store and every log line are searched for each patient
identifier, tag value and credential the PACS holds: no PHI leaves ingest.

Kept cheap: 32 px slices, one epoch, and a gate floor no model reaches, so that no run deploys and
no later run compares with a served model (the drift report and the champion's scoring, tested in
test_pipeline_e2e.py, would double the cost of runs 2 and 3).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_fixtures import FAKE_PHI
from helpers import TINY_CONFIG
from pacs import OrthancServer, running_orthanc, store_ct_study

from tumorflow.core.config import DicomWebConfig, load_config
from tumorflow.pipelines.runner import RunSummary, run_local

pytestmark = pytest.mark.e2e

SERIES_OF = {"normal": "CLEAR CT", "tumor": "LESION CT"}
LEVEL_HU = {"normal": 40.0, "tumor": 300.0}
SITES = ("South", "North")
STUDY_DESCRIPTION = "tumorflow-pipeline"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    yield from running_orthanc(tmp_path_factory)


def _store_patient(orthanc: OrthancServer, folder: Path, patient: int, label: str) -> str:
    """One patient's CT study, two 32 px slices (the first RLE-compressed), from one of two
    sites with their own scanner maker."""
    return store_ct_study(
        orthanc,
        folder,
        patient=patient,
        level_hu=LEVEL_HU[label],
        study_description=STUDY_DESCRIPTION,
        series_description=SERIES_OF[label],
        slices=2,
        size=32,
        institution=f"{FAKE_PHI['InstitutionName']} {SITES[patient % 2]}",
        manufacturer=("ACME", "Globex")[patient % 2],
        compress_first=True,
    )


def _phi_found(root: Path, needles: list[str]) -> list[tuple[str, str]]:
    found = []
    for path in root.rglob("*"):
        name = str(path.relative_to(root))
        found += [(name, needle) for needle in needles if needle in name]
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [(name, needle) for needle in needles if needle.encode() in data]
    return found


def _ran(summary: RunSummary, task: str) -> bool:
    return isinstance(summary.task_seconds.get(task), float)


def test_a_pacs_query_trains_caches_retrains_on_a_new_study_and_leaks_no_phi(
    orthanc: OrthancServer,
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_server: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import mlflow

    caplog.set_level("DEBUG")
    login = DicomWebConfig()
    monkeypatch.setenv(login.username_env, orthanc.username)
    monkeypatch.setenv(login.password_env, orthanc.password)
    made = tmp_path_factory.mktemp("hospital")
    studies = [
        _store_patient(orthanc, made, patient, "normal" if patient < 8 else "tumor")
        for patient in range(16)
    ]
    run_root = tmp_path_factory.mktemp("pacs-e2e")
    cache = tmp_path_factory.mktemp("pacs-cache")
    salt = tmp_path_factory.mktemp("secret") / "salt"
    salt.write_text("a secret of this hospital\n")
    config = load_config(
        TINY_CONFIG,
        preset="phantom",
        overrides=[
            f"run_root={run_root}",
            f"tracking.tracking_uri={mlflow_server}",
            f"dataset.source=dicomweb+{orthanc.dicomweb}?ModalitiesInStudy=CT"
            f"&StudyDescription={STUDY_DESCRIPTION}",
            "dataset.name=hospital-ct",
            "dataset.subdir=",
            "dataset.class_map={clear ct: normal, lesion ct: tumor}",
            "dataset.classes=[normal, tumor]",
            f"dataset.dicom.pseudonym_salt_file={salt}",
            "dataset.dicomweb.auth=basic",
            "dataset.dicomweb.label_tag=SeriesDescription",
            f"dataset.dicomweb.cache_dir={cache}",
            "dataset.dicomweb.page_size=10",
            # a floor out of reach: no run deploys, so no run compares with a served model
            "gate.rules=[{metric: accuracy, threshold: 1.01}, {metric: 'recall:tumor', "
            "threshold: 0.0, per: site, min_cases: 1}]",
            "gate.bootstrap_resamples=0",
            "split.phash_max_distance=0",
            "train.image_size=32",
            "train.stage1.epochs=1",
            "train.stage2.epochs=0",
            "train.calibration=none",
            "train.ood=none",
            "deploy.model_name=hospital-ct",
        ],
    )

    first = run_local(config)
    assert first.dataset_version and first.dataset_version.startswith("sha256:")
    assert _ran(first, "train")
    assert first.gate["passed"] is False and first.deployed_version is None
    (decision,) = first.run_dir.glob("**/decision.json")
    decision = json.loads(decision.read_text())
    assert set(decision["slices"]) >= {"site", "manufacturer"}
    assert any(rule["kind"] == "slice" for rule in decision["rules"])
    (manifest,) = first.run_dir.glob("**/split/split_manifest.json")
    assert json.loads(manifest.read_text())["grouping"]["patients"] == 16

    # the same query over the same PACS: the same version, training from the cache
    second = run_local(config)
    assert second.dataset_version == first.dataset_version
    assert _ran(second, "dataset-version")
    for task in ("download", "validate-and-split", "train"):
        assert second.task_seconds.get(task) == "cached", task

    # a new patient's study in the PACS: a new version, downloaded, split and trained again
    studies.append(_store_patient(orthanc, made, 16, "tumor"))
    third = run_local(config)
    assert third.dataset_version not in (None, first.dataset_version)
    for task in ("download", "validate-and-split", "train"):
        assert _ran(third, task), task
    (manifest,) = third.run_dir.glob("**/split/split_manifest.json")
    assert json.loads(manifest.read_text())["grouping"]["patients"] == 17
    client = mlflow.MlflowClient(mlflow_server)
    trained_on = {
        run.data.tags.get("tumorflow.dataset_version")
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    }
    assert {first.dataset_version, third.dataset_version} <= trained_on

    # no PHI out: the search finds it where it is (the fetched instances), and nowhere else
    token = base64.b64encode(f"{orthanc.username}:{orthanc.password}".encode()).decode()
    needles = sorted({*FAKE_PHI.values(), *studies, orthanc.password, token})
    assert {needle for _, needle in _phi_found(cache, needles)} >= {*FAKE_PHI.values(), *studies}
    found = _phi_found(run_root, needles)
    mlflow_root = next(Path(tmp_path_factory.getbasetemp()).glob("mlflow-server*"))
    found += _phi_found(mlflow_root, needles)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            record = json.dumps(
                {"params": run.data.params, "tags": run.data.tags, "name": run.info.run_name}
            )
            found += [("mlflow run", n) for n in needles if n in record]
    out, err = capfd.readouterr()
    logs = out + err + "\n".join(r.getMessage() for r in caplog.records)
    found += [("log", n) for n in needles if n in logs]
    assert not found, found
