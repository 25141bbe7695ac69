"""`tumorflow release show|diff` on registered versions with real run folders, and `tumorflow
audit verify` on a log someone edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_release_run

from tumorflow.cli.main import main
from tumorflow.components.release import audit_log, registry
from tumorflow.components.release.signing import generate_key
from tumorflow.components.release.trust_root import TrustRoot, sign_decision

MODEL = "kidney-ct"


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two registered versions of kidney-ct, approved by alice then bob, with their runs."""
    root = tmp_path_factory.mktemp("runs")
    keys = {n: generate_key(root / "keys" / n, n) for n in ("alice", "bob")}
    TrustRoot.from_dict(
        {
            "signers": {n: [k.public_key] for n, k in keys.items()},
            "models": {MODEL: {"approval": "manual", "approvers": ["alice", "bob"]}},
        }
    ).save(root / "trust_root.yaml")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = registry.connect(tracking_uri)
    client.create_registered_model(MODEL)
    for version, (run, seed, who) in enumerate([("run-a", 1, "alice"), ("run-b", 3, "bob")], 1):
        digests = write_release_run(root, run, seed=seed, dataset_version=f"data-{seed}")
        client.create_model_version(
            MODEL,
            source=str(root / "pipeline_root" / run / "train" / "model"),
            tags={"tumorflow.pipeline_run": run, "serving_digest": digests["serving_digest"]},
        )
        signed = sign_decision(
            keys[who], "approve", model_name=MODEL, model_version=str(version), **digests
        )
        registry.store_decision(client, MODEL, str(version), signed)
        audit_log.append(
            root / "audit.jsonl",
            {"who": who, "what": "approval", "model_name": MODEL, "model_version": str(version)},
            keys[who],
            decision=signed,
        )
        audit_log.append(
            root / "audit.jsonl",
            {"who": who, "what": "deploy", "model_name": MODEL, "model_version": str(version)},
            keys[who],
        )
    return root, tracking_uri


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().out


def test_release_show_lists_data_digests_metrics_rules_and_decisions(released, capsys) -> None:
    root, tracking_uri = released
    flags = ["--run-root", str(root), "--tracking-uri", tracking_uri]
    code, out = _run(["release", "show", MODEL, "1", *flags], capsys)
    assert code == 0
    assert "data-1" in out and "split manifest sha256" in out
    assert ("accuracy" in out and "PASS accuracy" in out) or "FAIL accuracy" in out
    assert "alice" in out and "VERIFIED: verified against the trust root" in out
    assert "deploy by alice" in out
    code, out = _run(["release", "show", MODEL, "1", *flags, "--json"], capsys)
    record = json.loads(out)
    assert record["data"]["dataset_version"] == "data-1"
    assert len(record["metrics"]["accuracy"]["ci"]) == 2
    assert {d["signer"] for d in record["decisions"]} == {"alice"}
    assert set(record["decisions"][0]["found_in"]) == {
        "registry tag decision.1.approve",
        "audit log entry 1",
    }
    page = root / "release-1.html"
    code, out = _run(["release", "show", MODEL, "1", *flags, "--html", str(page)], capsys)
    assert code == 0 and page.read_text().startswith("<!doctype html>")
    assert "data-1" in page.read_text()


def test_release_diff_names_data_metrics_and_who_approved(released, capsys) -> None:
    root, tracking_uri = released
    flags = ["--run-root", str(root), "--tracking-uri", tracking_uri]
    code, out = _run(["release", "diff", MODEL, "1", "2", *flags], capsys)
    assert code == 0
    assert "dataset_version: data-1 -> data-3" in out
    assert "approved by: alice (approve) -> bob (approve)" in out
    code, out = _run(["release", "diff", MODEL, "1", "2", *flags, "--json"], capsys)
    change = json.loads(out)
    assert change["data"]["dataset_version"] == {"from": "data-1", "to": "data-3"}
    assert "accuracy" in change["metrics"]


def test_audit_verify_names_the_first_changed_entry(released, tmp_path: Path, capsys) -> None:
    root, _ = released
    log = tmp_path / "audit.jsonl"
    log.write_bytes((root / "audit.jsonl").read_bytes())
    Path(audit_log.head_uri(log)).write_bytes(
        Path(audit_log.head_uri(root / "audit.jsonl")).read_bytes()
    )
    flags = ["--run-root", str(root), "--log", str(log)]
    code, out = _run(["audit", "verify", *flags], capsys)
    assert code == 0 and "OK (against the trust root)" in out and "head signed by bob" in out
    lines = log.read_text().splitlines()
    lines[1] = lines[1].replace('"deploy"', '"rollback"')
    log.write_text("\n".join(lines) + "\n")
    code, out = _run(["audit", "verify", *flags], capsys)
    assert code == 1 and "TAMPERED" in out and "first bad entry: 2" in out
    code, out = _run(["audit", "verify", *flags, "--json"], capsys)
    assert json.loads(out)["first_bad"] == 2
