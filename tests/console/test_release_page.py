"""The console's page of one version's release record: what a reviewer files. A viewer sees the
data, the metrics and every signed decision, verified against the console's trust root: a valid
signature by someone the trust root does not list is shown as not verified."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_release_run

from tumorflow.components.release import audit_log, registry
from tumorflow.components.release.signing import generate_key
from tumorflow.components.release.trust_root import TrustRoot, sign_decision

MODEL = "kidney-ct"


@pytest.fixture()
def released(tmp_path: Path):
    """Version 1 of kidney-ct approved by alice (an approver) and, on the registry, also by
    mallory, whose key is valid but in no trust root."""
    root = tmp_path / "runs"
    keys = {n: generate_key(tmp_path / "keys" / n, n) for n in ("alice", "mallory")}
    TrustRoot.from_dict(
        {
            "signers": {"alice": [keys["alice"].public_key]},
            "models": {MODEL: {"approval": "manual", "approvers": ["alice"]}},
        }
    ).save(root / "trust_root.yaml")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = registry.connect(tracking_uri)
    client.create_registered_model(MODEL)
    digests = write_release_run(root, "run-a", seed=1, dataset_version="data-1")
    client.create_model_version(
        MODEL,
        source=str(root / "pipeline_root" / "run-a" / "train" / "model"),
        tags={"tumorflow.pipeline_run": "run-a", "serving_digest": digests["serving_digest"]},
    )
    for who in ("alice", "mallory"):
        signed = sign_decision(keys[who], "approve", model_name=MODEL, model_version="1", **digests)
        registry.store_decision(client, MODEL, "1", signed)
    audit_log.append(
        root / "audit.jsonl",
        {"who": "alice", "what": "deploy", "model_name": MODEL, "model_version": "1"},
        keys["alice"],
    )
    return root, tracking_uri


def _console(root: Path, tracking_uri: str):
    from fastapi.testclient import TestClient

    from tumorflow.console.app import ConsoleSettings, create_app
    from tumorflow.console.auth import token_digest
    from tumorflow.core.config import ConsoleConfig

    console = ConsoleConfig.model_validate(
        {
            "tokens": {"victor": token_digest("victor-token")},
            "roles": {"*": {"viewer": ["victor"]}},
        }
    )
    settings = ConsoleSettings(
        console=console,
        run_root=root,
        tracking_uri=tracking_uri,
        model_base_path=str(root / "models"),
        model_name=MODEL,
    )
    return TestClient(create_app(settings), follow_redirects=False)


def test_a_viewer_reads_a_versions_release_record_with_its_decisions_verified(released):
    root, tracking_uri = released
    client = _console(root, tracking_uri)
    assert client.get(f"/models/{MODEL}/versions/1").status_code in (303, 401)  # sign in first
    assert client.post("/login", data={"token": "victor-token"}).status_code == 303
    page = client.get(f"/models/{MODEL}/versions/1")
    assert page.status_code == 200, page.text
    text = page.text
    assert "data-1" in text  # the dataset version
    assert "accuracy" in text  # metrics, with the gate's rules
    assert "alice" in text and "mallory" in text
    alice = text[text.index("alice") :]
    assert "VERIFIED" in text
    assert "NOT verified" in text and "mallory" in text[text.index("NOT verified") - 2000 :]
    assert "deploy" in alice
    missing = client.get(f"/models/{MODEL}/versions/9")
    assert missing.status_code in (404, 409, 422) and "no version 9" in missing.text
