"""A version's release record from a run's real files, the registry's tags and the audit log:
every signed decision shown verified or not, and what changed between two versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_release_run

from tumorflow.components.release import audit_log, release_record
from tumorflow.components.release.signing import Signer, generate_key
from tumorflow.components.release.trust_root import TrustRoot, sign_decision

MODEL = "kidney-ct"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Signer]:
    folder = tmp_path_factory.mktemp("keys")
    return {name: generate_key(folder / name, name) for name in ("alice", "bob", "mallory")}


@pytest.fixture(scope="module")
def trust(keys: dict[str, Signer]) -> TrustRoot:
    return TrustRoot.from_dict(
        {
            "signers": {n: [keys[n].public_key] for n in ("alice", "bob")},
            "models": {MODEL: {"approval": "manual", "approvers": ["alice", "bob"]}},
        }
    )


def _files(run_root: Path, run: str) -> release_record.RunFiles:
    root = run_root / "pipeline_root" / run
    return release_record.RunFiles(
        split_manifest=root / "validate-and-split/split/split_manifest.json",
        model_info=root / "train/model/model_info.json",
        metrics=root / "evaluate/evaluation/metrics.json",
        decision=root / "gate/decision/decision.json",
    )


def _version(tmp_path: Path, keys, version: str, run: str, seed: int, approver: str, **kw):
    digests = write_release_run(tmp_path, run, seed=seed, dataset_version=f"data-{seed}", **kw)
    signed = sign_decision(
        keys[approver],
        "approve",
        model_name=MODEL,
        model_version=version,
        reason="reviewed the gate report",
        pipeline_run=run,
        **digests,
    )
    tags = {
        "tumorflow.pipeline_run": run,
        "serving_digest": digests["serving_digest"],
        "decision.1.approve": signed.to_json(),
    }
    return tags, digests


def test_the_record_lists_data_metrics_with_cis_gate_rules_and_verified_decisions(
    tmp_path: Path, keys, trust
) -> None:
    tags, digests = _version(tmp_path, keys, "3", "run-a", 1, "alice")
    # A registry writer adds mallory's validly signed approval: she is in no trust root.
    forged = sign_decision(
        keys["mallory"], "approve", model_name=MODEL, model_version="3", **digests
    )
    tags["decision.2.approve"] = forged.to_json()
    log = tmp_path / "audit.jsonl"
    audit_log.append(
        log, {"who": "alice", "what": "deploy", "model_name": MODEL, "model_version": "3"}
    )
    record = release_record.build(
        MODEL,
        "3",
        tags=tags,
        files=_files(tmp_path, "run-a"),
        audit_entries=audit_log.read(log),
        trust=trust,
    )
    assert record["data"]["dataset_version"] == "data-1"
    assert len(record["data"]["split_manifest_sha256"]) == 64
    low, high = record["metrics"]["accuracy"]["ci"]
    assert low <= record["metrics"]["accuracy"]["value"] <= high
    assert record["gate"]["passed"] is not None
    assert record["gate"]["decision_digest"] == digests["decision_digest"]
    assert [r["metric"] for r in record["gate"]["rules"]] == ["accuracy"]
    by = {d["signer"]: d for d in record["decisions"]}
    assert by["alice"]["verified"] and "trust root" in by["alice"]["verification"]
    assert not by["mallory"]["verified"] and "refused" in by["mallory"]["verification"]
    assert [h["what"] for h in record["history"]] == ["deploy"]
    text = release_record.render_text(record)
    assert "data-1" in text and "NOT VERIFIED" in text and "VERIFIED" in text


def test_the_diff_names_changed_data_config_metrics_and_approver(
    tmp_path: Path, keys, trust
) -> None:
    tags_a, _ = _version(tmp_path, keys, "3", "run-a", 1, "alice")
    tags_b, _ = _version(tmp_path, keys, "4", "run-b", 3, "bob", epochs=5)
    old = release_record.build(
        MODEL, "3", tags=tags_a, files=_files(tmp_path, "run-a"), trust=trust
    )
    new = release_record.build(
        MODEL, "4", tags=tags_b, files=_files(tmp_path, "run-b"), trust=trust
    )
    change = release_record.diff(old, new)
    assert change["data"]["dataset_version"] == {"from": "data-1", "to": "data-3"}
    assert change["config"]["stage1"] == {"from": {"epochs": 2}, "to": {"epochs": 5}}
    assert "accuracy" in change["metrics"]
    assert change["approved_by"] == {"from": ["alice (approve)"], "to": ["bob (approve)"]}
    text = release_record.render_diff_text(change)
    assert "data-1 -> data-3" in text and "alice (approve) -> bob (approve)" in text


def test_the_record_shows_each_external_set_beside_the_internal_split(
    tmp_path: Path, keys, trust
) -> None:
    import json

    tags, _ = _version(tmp_path, keys, "3", "run-a", 1, "alice")
    files = _files(tmp_path, "run-a")
    decision = json.loads(files.decision.read_text())
    warning = "external set site-b: macro_f1 0.610 on 40 images, 0.350 worse than ..."
    decision["warnings"] = [warning]
    decision["external_sets"] = {
        "site-b": {
            "n": 40,
            "values": {"macro_f1": 0.61},
            "intervals": {"macro_f1": [0.45, 0.74]},
            "champion": None,
            "internal": {"macro_f1": 0.96},
            "drop_metric": "macro_f1",
            "drop": 0.35,
            "warning": warning,
        }
    }
    files.decision.write_text(json.dumps(decision))

    record = release_record.build(MODEL, "3", tags=tags, files=files, trust=trust)

    site = record["gate"]["external_sets"]["site-b"]
    assert site["n"] == 40 and site["drop"] == 0.35
    assert site["metrics"]["macro_f1"] == {
        "value": 0.61,
        "ci": [0.45, 0.74],
        "internal": 0.96,
        "champion": None,
    }
    text = release_record.render_text(record)
    assert "site-b (n=40) macro_f1" in text and "internal 0.960, drop 0.350" in text
    assert f"WARNING {warning}" in text
