"""The approval step accepts only signed decisions about this very candidate, from its approvers.

A real MLflow server on loopback is the registry; whoever can write to it can write tags, so
every forgery below is made with the plain MLflow client.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from helpers import wait_until
from mlflow import MlflowClient

from tumorflow.components.release.approval import (
    ApprovalError,
    record_decision,
    run_approval,
)
from tumorflow.components.release.signing import generate_key
from tumorflow.components.release.trust_root import TrustRoot
from tumorflow.core.config import GateConfig

pytestmark = pytest.mark.service


@pytest.fixture()
def keys(tmp_path):
    return {
        name: generate_key(tmp_path / "keys" / name, name)
        for name in ("alice", "bob", "console", "pipeline")
    }


def _trust(keys, approval="manual") -> TrustRoot:
    return TrustRoot.from_dict(
        {
            "signers": {"alice": keys["alice"].public_key, "bob": keys["bob"].public_key},
            "delegates": {"console": keys["console"].public_key},
            "pipeline": keys["pipeline"].public_key,
            "models": {"*": {"approval": approval, "approvers": ["alice"]}},
        }
    )


def _candidate(tmp_path, passed=True):
    """A run's model folder (serving export + recorded digest) and gate decision."""
    run = f"run-{uuid.uuid4().hex[:6]}"
    model = tmp_path / run / "model"
    (model / "saved_model").mkdir(parents=True)
    (model / "saved_model" / "saved_model.pb").write_bytes(run.encode())
    (model / "model.keras").write_bytes(b"weights")
    (model / "model_info.json").write_text(
        json.dumps(
            {
                "classes": ["a", "b"],
                "saved_model_sha256": uuid.uuid4().hex * 2,
                "weights_sha256": uuid.uuid4().hex * 2,
            }
        )
    )
    decision = tmp_path / run / "decision"
    decision.mkdir()
    (decision / "decision.json").write_text(json.dumps({"passed": passed, "rules": []}))
    return run, model, decision


def _step(tmp_path, tracking, name, trust, keys, *, run=None, approval="manual", timeout_s=60.0):
    run, model, decision = run or _candidate(tmp_path)
    return run_approval(
        decision,
        model,
        GateConfig(approval=approval, approval_timeout_s=timeout_s, approval_poll_s=0.1),
        tracking_uri=tracking,
        model_name=name,
        pipeline_run=run,
        output_dir=tmp_path / run / "record",
        trust=trust,
        pipeline_signer=keys["pipeline"],
    )


@pytest.fixture()
def waiting_step(tmp_path, mlflow_server, approval_announcements, keys):
    """Start the approval step of a fresh run in a thread; return once it waits."""

    def start(name, trust, timeout_s=60.0, candidate=None):
        candidate = candidate or _candidate(tmp_path)
        result: list = []
        thread = threading.Thread(
            target=lambda: result.append(
                _step(
                    tmp_path, mlflow_server, name, trust, keys, run=candidate, timeout_s=timeout_s
                )
            )
        )
        thread.start()
        wait_until(
            lambda: candidate[0] in approval_announcements or not thread.is_alive(),
            30,
            "the approval step waiting",
        )
        return candidate[0], thread, result

    return start


def _name():
    return f"m-{uuid.uuid4().hex[:6]}"


def test_an_approvers_signed_approval_releases_the_run(tmp_path, mlflow_server, keys, waiting_step):
    name, trust = _name(), _trust(keys)
    run, thread, result = waiting_step(name, trust)
    record_decision(mlflow_server, run, "approved", "looks good", signer=keys["alice"], trust=trust)
    thread.join(timeout=30)
    (decision,) = result
    assert decision.approved and decision.by == "alice" and not decision.refused
    saved = json.loads((tmp_path / run / "record" / "approval.json").read_text())
    (signed,) = saved["records"]
    assert signed["record"]["meaning"] == "approved for clinical use"
    assert signed["record"]["signer"] == "alice" and signed["signature"].startswith("-----BEGIN")
    with pytest.raises(ApprovalError, match="already approved by alice"):
        record_decision(mlflow_server, run, "rejected", "no", signer=keys["alice"], trust=trust)


def test_forged_approval_tags_are_refused_and_the_run_times_out(
    tmp_path, mlflow_server, keys, waiting_step
):
    name, trust = _name(), _trust(keys)
    _, thread, result = waiting_step(name, trust, timeout_s=8.0)
    client = MlflowClient(mlflow_server)
    (version,) = client.search_model_versions(f"name = '{name}'")
    client.set_model_version_tag(name, version.version, "approval.by", "alice")
    client.set_model_version_tag(name, version.version, "approval.status", "approved")
    thread.join(timeout=30)
    (decision,) = result
    assert decision.status == "timed_out" and not decision.records
    assert "not a signed decision" in decision.refused[0]
    assert "refused" in decision.reason
    tags = client.get_model_version(name, version.version).tags
    assert tags["approval.status"] == "timed_out"
    assert "plain registry tag" in tags["approval.refused"]


def test_a_non_approvers_valid_signature_is_refused(tmp_path, mlflow_server, keys, waiting_step):
    name, trust = _name(), _trust(keys)
    run, thread, result = waiting_step(name, trust)
    with pytest.raises(ApprovalError, match="bob may not approve"):
        record_decision(mlflow_server, run, "approved", "ok", signer=keys["bob"], trust=trust)
    # Signed with bob's real key and written straight into the registry, past the CLI's check:
    lenient = TrustRoot.from_dict({**trust.to_dict(), "models": {"*": {"approvers": ["bob"]}}})
    record_decision(mlflow_server, run, "approved", "ok", signer=keys["bob"], trust=lenient)
    client = MlflowClient(mlflow_server)
    (version,) = client.search_model_versions(f"name = '{name}'")

    def refused() -> str:
        return client.get_model_version(name, version.version).tags.get("approval.refused", "")

    wait_until(lambda: "bob may not approve" in refused(), 30, "bob's record refused")
    assert thread.is_alive()  # still waiting for an approver
    record_decision(mlflow_server, run, "approved", "ok", signer=keys["alice"], trust=trust)
    thread.join(timeout=30)
    (decision,) = result
    assert decision.approved and decision.by == "alice"
    assert any("bob may not approve" in why for why in decision.refused)


def test_an_approval_replayed_onto_another_candidate_is_refused(
    tmp_path, mlflow_server, keys, waiting_step
):
    name, trust = _name(), _trust(keys)
    first_run, thread, _ = waiting_step(name, trust)
    record_decision(
        mlflow_server, first_run, "approved", "v1 ok", signer=keys["alice"], trust=trust
    )
    thread.join(timeout=30)
    run, thread, result = waiting_step(name, trust, timeout_s=8.0)
    client = MlflowClient(mlflow_server)
    versions = {
        v.tags["tumorflow.pipeline_run"]: v
        for v in client.search_model_versions(f"name = '{name}'")
    }
    old = versions[first_run].tags["decision.1.approve"]
    client.set_model_version_tag(name, versions[run].version, "decision.1.approve", old)
    thread.join(timeout=30)
    (decision,) = result
    assert decision.status == "timed_out"
    assert "model_version mismatch" in decision.refused[0]


def test_rejection_and_override_need_a_reason_and_a_failed_gate_an_override(
    tmp_path, mlflow_server, keys, waiting_step
):
    name, trust = _name(), _trust(keys)
    run, thread, result = waiting_step(name, trust, candidate=_candidate(tmp_path, passed=False))
    with pytest.raises(ApprovalError, match="needs a reason"):
        record_decision(mlflow_server, run, "rejected", signer=keys["alice"], trust=trust)
    with pytest.raises(ApprovalError, match="--override"):
        record_decision(mlflow_server, run, "approved", "fine", signer=keys["alice"], trust=trust)
    record_decision(
        mlflow_server,
        run,
        "approved",
        "site B only",
        signer=keys["alice"],
        trust=trust,
        override=True,
    )
    thread.join(timeout=30)
    (decision,) = result
    assert decision.approved and decision.override
    assert decision.records[0]["record"]["meaning"] == "override of a failed gate"


def test_the_console_signs_for_the_user_it_authenticated(
    tmp_path, mlflow_server, keys, waiting_step
):
    name, trust = _name(), _trust(keys)
    run, thread, result = waiting_step(name, trust)
    via = "console: proxy header X-Forwarded-Email at 2026-12-03T10:00:00Z"
    record_decision(
        mlflow_server,
        run,
        "approved",
        "ok",
        signer=keys["console"],
        trust=trust,
        identity="alice",
        authenticated_via=via,
    )
    thread.join(timeout=30)
    (decision,) = result
    assert decision.by == "alice"
    assert decision.records[0]["record"]["authenticated_via"] == via


@pytest.mark.parametrize(("passed", "status"), [(True, "approved"), (False, "rejected")])
def test_auto_policy_signs_a_passing_gate_with_the_pipeline_key(
    tmp_path, mlflow_server, keys, passed, status
):
    result = _step(
        tmp_path,
        mlflow_server,
        _name(),
        _trust(keys, "auto"),
        keys,
        run=_candidate(tmp_path, passed),
        approval="auto",
    )
    assert result.status == status
    if passed:
        assert result.records[0]["record"]["action"] == "auto_approve"
        assert result.by == "pipeline"


def test_the_trust_roots_manual_policy_outranks_a_runs_auto(tmp_path, mlflow_server, keys):
    result = _step(
        tmp_path,
        mlflow_server,
        _name(),
        _trust(keys, "manual"),
        keys,
        approval="auto",
        timeout_s=0.5,
    )
    assert result.status == "timed_out"
    assert "trust root" in result.policy_source and "cannot lower it" in result.policy_source


def test_the_registrys_policy_tag_no_longer_counts(tmp_path, mlflow_server, keys):
    """A registry writer who lowers the model's policy tag to auto changes nothing."""
    name = _name()
    client = MlflowClient(mlflow_server)
    client.create_registered_model(name)
    client.set_registered_model_tag(name, "tumorflow.approval_policy", "auto")
    result = _step(
        tmp_path, mlflow_server, name, _trust(keys, "manual"), keys, approval="auto", timeout_s=0.5
    )
    assert result.status == "timed_out"


def test_auto_policy_without_a_registry_is_signed_too(tmp_path, keys):
    result = _step(tmp_path, None, _name(), _trust(keys, "auto"), keys, approval="auto")
    assert result.approved and result.records[0]["record"]["action"] == "auto_approve"
    with pytest.raises(ApprovalError, match="manual approval needs an MLflow"):
        _step(tmp_path, None, _name(), _trust(keys, "manual"), keys, approval="auto")


def test_the_approval_report_links_to_the_runs_review_page(tmp_path, keys):
    """The pipeline UI shows the approval task's Markdown: the outcome and the console's page of
    that run, on the configured base URL; the step reads the trust root and pipeline key files."""
    import re

    from kfp import dsl

    from tumorflow.pipelines.steps import approval

    trust_file = tmp_path / "trust_root.yaml"
    _trust(keys, "auto").save(trust_file)
    _, model, decision = _candidate(tmp_path)
    report = tmp_path / "approval-report.md"
    approved = approval.python_func(
        decision=dsl.Artifact(uri=str(decision)),
        model=dsl.Model(uri=str(model)),
        gate_config=GateConfig(approval="auto").model_dump(),
        tracking_uri="",
        model_name="kidney-ct",
        pipeline_run="retrain-20261201-1405",
        trigger_reason="",
        record=dsl.Artifact(uri=str(tmp_path / "record")),
        report=dsl.Markdown(uri=str(report)),
        console_base_url="https://console.example.org/review/",
        trust_root=str(trust_file),
        pipeline_key=str(tmp_path / "keys" / "pipeline"),
    )
    assert approved
    text = report.read_text()
    link = re.search(r"\[[^\]]+\]\(([^)]+)\)", text)
    assert link and link.group(1) == (
        "https://console.example.org/review/runs/retrain-20261201-1405"
    )
    assert "approved" in text.splitlines()[0] and "| decided by | pipeline |" in text
