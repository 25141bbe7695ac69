"""Deploy, serve-time checks, rollback and promote with signing on: only signed decisions about
this very SavedModel move anything."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tumorflow.components.release.deploy import (
    DeployRefused,
    deploy_model,
    promote_canary,
    release_status,
    rollback,
)
from tumorflow.components.release.signing import generate_key
from tumorflow.components.release.trust_root import TrustRoot, sign_decision
from tumorflow.core.serving_layout import serving_labels

MODEL = "kidney"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dir_in):
    """Two exported model folders of different weights, made once for the module."""
    root = tmp_path_factory.mktemp("signed-models")
    return [model_dir_in(root, f"model{i}", confusion=i, exported=True) for i in range(2)]


@pytest.fixture()
def keys(tmp_path):
    return {n: generate_key(tmp_path / "keys" / n, n) for n in ("alice", "carol", "bob")}


@pytest.fixture()
def trust(keys):
    return TrustRoot.from_dict(
        {
            "signers": {n: k.public_key for n, k in keys.items()},
            "models": {"*": {"approvers": ["alice"], "operators": ["carol"]}},
        }
    )


def _gate(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}-decision.json"
    path.write_text(json.dumps({"passed": True, "rules": [], "run": name}))
    return path


def _approval(tmp_path, name, model_dir, decision, signer, **changes):
    info = json.loads((model_dir / "model_info.json").read_text())
    fields = {
        "model_name": MODEL,
        "serving_digest": info["saved_model_sha256"],
        "decision_digest": hashlib.sha256(decision.read_bytes()).hexdigest(),
        "reason": "ok",
    } | changes
    signed = sign_decision(signer, "approve", **fields)
    folder = tmp_path / f"{name}-approval"
    folder.mkdir()
    (folder / "approval.json").write_text(
        json.dumps(
            {
                "status": "approved",
                "records": [{"record": signed.record, "signature": signed.signature}],
            }
        )
    )
    return folder


def _deploy(model_dir, decision, base, approval_dir, trust, run="run", rollout="stable"):
    return deploy_model(
        model_dir,
        decision,
        str(base),
        MODEL,
        keep_versions=2,
        tracking_uri=None,
        pipeline_run=run,
        approval_dir=approval_dir,
        trust=trust,
        rollout=rollout,
    )


def test_a_signed_approval_is_published_and_verifies_at_load(tmp_path, exported, keys, trust):
    decision = _gate(tmp_path, "a")
    approval = _approval(tmp_path, "a", exported[0], decision, keys["alice"])
    result = _deploy(exported[0], decision, tmp_path / "models", approval, trust)
    served = tmp_path / "models" / MODEL / str(result.version)
    release = json.loads((served / "assets.extra" / "release.json").read_text())
    assert release["serving_digest"] == result.serving_digest
    assert release["records"][0]["record"]["signer"] == "alice"
    assert release_status(served, MODEL, trust) is None
    # A changed byte in the served SavedModel, or the record gone: not loadable.
    (served / "saved_model.pb").write_bytes((served / "saved_model.pb").read_bytes() + b"\0")
    assert "serving_digest mismatch" in release_status(served, MODEL, trust)
    (served / "assets.extra" / "release.json").unlink()
    assert release_status(served, MODEL, trust) == "unsigned: no release record"


@pytest.mark.parametrize(
    ("signer", "changes", "why"),
    [
        ("bob", {}, "bob may not approve"),
        ("alice", {"serving_digest": "f" * 64}, "serving_digest mismatch"),
        ("alice", {"decision_digest": "f" * 64}, "decision_digest mismatch"),
    ],
)
def test_deploy_refuses_what_does_not_verify_and_publishes_nothing(
    tmp_path, exported, keys, trust, signer, changes, why
):
    decision = _gate(tmp_path, "a")
    approval = _approval(tmp_path, "a", exported[0], decision, keys[signer], **changes)
    with pytest.raises(DeployRefused, match=why):
        _deploy(exported[0], decision, tmp_path / "models", approval, trust)
    assert not (tmp_path / "models" / MODEL).exists() or not any(
        (tmp_path / "models" / MODEL).iterdir()
    )


def test_an_approval_json_without_a_signature_deploys_nothing(tmp_path, exported, trust):
    decision = _gate(tmp_path, "a")
    folder = tmp_path / "forged"
    folder.mkdir()
    (folder / "approval.json").write_text(json.dumps({"status": "approved", "by": "alice"}))
    with pytest.raises(DeployRefused, match="no signed approval"):
        _deploy(exported[0], decision, tmp_path / "models", folder, trust)


@pytest.fixture()
def two_versions(tmp_path, exported, keys, trust):
    base = tmp_path / "models"
    for i, model_dir in enumerate(exported):
        decision = _gate(tmp_path, f"v{i}")
        _deploy(
            model_dir,
            decision,
            base,
            _approval(tmp_path, f"v{i}", model_dir, decision, keys["alice"]),
            trust,
            run=f"run-{i}",
        )
    assert serving_labels(str(base), MODEL)[0]["stable"] == 2
    return base


def test_an_unsigned_rollback_does_not_move_stable(two_versions, trust):
    with pytest.raises(DeployRefused, match="needs a signed record"):
        rollback(None, MODEL, str(two_versions), trust=trust)
    assert serving_labels(str(two_versions), MODEL)[0]["stable"] == 2


def test_a_rollback_signed_by_someone_else_does_not_move_stable(two_versions, keys, trust):
    with pytest.raises(DeployRefused, match="bob may not rollback"):
        rollback(None, MODEL, str(two_versions), trust=trust, signer=keys["bob"], reason="x")
    assert serving_labels(str(two_versions), MODEL)[0]["stable"] == 2


def test_an_operators_signed_rollback_moves_stable(two_versions, keys, trust):
    back = rollback(
        None, MODEL, str(two_versions), trust=trust, signer=keys["carol"], reason="drift on site B"
    )
    assert (back.stable, back.replaced) == (1, 2)
    assert serving_labels(str(two_versions), MODEL)[0]["stable"] == 1


def test_promote_needs_a_signature_too(tmp_path, exported, keys, trust):
    base = tmp_path / "models"
    for i, model_dir in enumerate(exported):
        decision = _gate(tmp_path, f"c{i}")
        _deploy(
            model_dir,
            decision,
            base,
            _approval(tmp_path, f"c{i}", model_dir, decision, keys["alice"]),
            trust,
            run=f"run-{i}",
            rollout="canary",
        )
    with pytest.raises(DeployRefused, match="needs a signed record"):
        promote_canary(None, MODEL, str(base), trust=trust)
    assert serving_labels(str(base), MODEL)[0] == {"stable": 1, "canary": 2}
    promote_canary(None, MODEL, str(base), trust=trust, signer=keys["alice"], reason="canary ok")
    assert serving_labels(str(base), MODEL)[0]["stable"] == 2


def test_a_version_copied_from_another_model_is_not_loadable(tmp_path, exported, keys, trust):
    decision = _gate(tmp_path, "a")
    approval = _approval(tmp_path, "a", exported[0], decision, keys["alice"])
    result = _deploy(exported[0], decision, tmp_path / "models", approval, trust)
    served = tmp_path / "models" / MODEL / str(result.version)
    other = tmp_path / "other" / "1"
    shutil.copytree(served, other)
    assert "about model 'kidney', not 'lung'" in release_status(other, "lung", trust)
