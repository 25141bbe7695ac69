"""No PHI out: the whole DAG under kfp.local on a DICOM set with fake PHI in its tags and file
names, tracked by a real MLflow server; then every file written, the MLflow store and every log
line are searched for each fake PHI string."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dicom_fixtures import FAKE_PHI, ct_phantom, write_dicom
from helpers import TINY_CONFIG

from tumorflow.core.config import load_config
from tumorflow.pipelines.runner import run_local

pytestmark = pytest.mark.e2e

NAME_IN_FILES = FAKE_PHI["PatientName"].replace("^", "_")
NEEDLES = sorted({*FAKE_PHI.values(), NAME_IN_FILES})


def _hospital_export(root: Path) -> Path:
    """normal/ and tumor/ CT series, one folder per patient named after them, from two sites."""
    for label, level in (("normal", 40.0), ("tumor", 300.0)):
        for p in range(8):
            folder = root / label / f"{NAME_IN_FILES}_{FAKE_PHI['PatientID']}_{label}{p}"
            for s in range(3):
                write_dicom(
                    folder / f"{NAME_IN_FILES}_{FAKE_PHI['AccessionNumber']}_{s}.dcm",
                    ct_phantom(level, seed=p * 100 + s + (50 if label == "tumor" else 0)),
                    patient_id=f"{FAKE_PHI['PatientID']}-{label}{p}",
                    institution=f"{FAKE_PHI['InstitutionName']} {'North' if p % 2 else 'South'}",
                    manufacturer=("ACME", "Globex")[p % 2],
                    compress=s == 0,
                )
    return root


def _phi_found(root: Path) -> list[tuple[str, str]]:
    found = []
    for path in root.rglob("*"):
        name = str(path.relative_to(root))
        found += [(name, needle) for needle in NEEDLES if needle in name]
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [(name, needle) for needle in NEEDLES if needle.encode() in data]
    return found


def test_a_dicom_run_writes_no_phi_anywhere(tmp_path_factory, mlflow_server, capfd, caplog):
    import mlflow

    caplog.set_level("DEBUG")
    source = _hospital_export(tmp_path_factory.mktemp("hospital"))
    run_root = tmp_path_factory.mktemp("dicom-e2e")
    salt = tmp_path_factory.mktemp("secret") / "salt"
    salt.write_text("a secret of this hospital\n")
    config = load_config(
        TINY_CONFIG,
        preset="phantom",
        overrides=[
            f"run_root={run_root}",
            f"tracking.tracking_uri={mlflow_server}",
            f"dataset.source={source}",
            "dataset.name=hospital-ct",
            "dataset.subdir=",
            "dataset.class_map={}",
            "dataset.classes=[normal, tumor]",
            f"dataset.dicom.pseudonym_salt_file={salt}",
            "gate.rules=[{metric: accuracy, threshold: 0.0}, {metric: 'recall:tumor', "
            "threshold: 0.0, per: site, min_cases: 1}]",
            "split.phash_max_distance=0",
            "deploy.model_name=hospital-ct",
        ],
    )
    summary = run_local(config)
    assert summary.gate is not None
    decisions = list(summary.run_dir.glob("**/decision.json"))
    assert decisions, "the gate wrote no decision"
    decision = json.loads(decisions[0].read_text())
    assert set(decision["slices"]) >= {"site", "manufacturer"}
    assert any(rule["kind"] == "slice" for rule in decision["rules"])
    # patients stayed together and were the split groups
    manifests = list(summary.run_dir.glob("**/split/split_manifest.json"))
    assert json.loads(manifests[0].read_text())["grouping"]["patients"] == 16

    # the search finds the PHI where it is: in the hospital's files, tags and names
    assert {needle for _, needle in _phi_found(source)} == set(NEEDLES)
    found = _phi_found(run_root)
    mlflow_root = next(Path(tmp_path_factory.getbasetemp()).glob("mlflow-server*"))
    found += _phi_found(mlflow_root)
    client = mlflow.MlflowClient(mlflow_server)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            record = json.dumps(
                {"params": run.data.params, "tags": run.data.tags, "name": run.info.run_name}
            )
            found += [("mlflow run", n) for n in NEEDLES if n in record]
    out, err = capfd.readouterr()
    logs = out + err + "\n".join(r.getMessage() for r in caplog.records)
    found += [("log", n) for n in NEEDLES if n in logs]
    assert not found, found
