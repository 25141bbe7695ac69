from __future__ import annotations

import json
import time
import uuid

import pytest

from tumorflow.components.release.approval import (
    ApprovalError,
    record_decision,
    run_approval,
    set_model_policy,
    wait_for_approval,
)
from tumorflow.components.release.registry import (
    RegistryError,
    connect,
    get_approval_policy,
    list_versions,
)
from tumorflow.core.config import GateConfig

pytestmark = pytest.mark.service


def test_a_waiting_run_sees_the_approval(
    tmp_path, mlflow_server, approval_candidate, approval_waiter
):
    name, run = approval_candidate(passed=True)
    thread, result = approval_waiter(name, run, timeout_s=60)
    assert thread.is_alive()
    record_decision(mlflow_server, run, "approved", "alice", "looks good")
    thread.join(timeout=30)
    (decision,) = result
    assert decision.approved and decision.by == "alice" and decision.comment == "looks good"
    assert decision.at is not None and not decision.override
    with pytest.raises(ApprovalError, match="already approved by alice"):
        record_decision(mlflow_server, run, "rejected", "bob", "changed my mind")


def test_a_waiting_run_sees_the_rejection_and_its_reason(
    tmp_path, mlflow_server, approval_candidate, approval_waiter
):
    name, run = approval_candidate(passed=True)
    thread, result = approval_waiter(name, run, timeout_s=60)
    with pytest.raises(ApprovalError, match="needs a reason"):
        record_decision(mlflow_server, run, "rejected", "bob")
    record_decision(mlflow_server, run, "rejected", "bob", "sensitivity on site B too low")
    thread.join(timeout=30)
    assert result[0].status == "rejected"
    assert "sensitivity on site B" in result[0].reason


def test_timeout_is_recorded_and_blocks_a_late_decision(
    tmp_path, mlflow_server, approval_candidate
):
    from mlflow import MlflowClient

    name, run = approval_candidate(passed=True)
    started = time.monotonic()
    decision = wait_for_approval(mlflow_server, name, run, timeout_s=1.0, poll_s=0.2)
    assert decision.status == "timed_out" and 1.0 <= time.monotonic() - started < 10
    assert "nothing deployed" in decision.reason
    tags = MlflowClient(mlflow_server).search_model_versions(f"name = '{name}'")[0].tags
    assert tags["approval.status"] == "timed_out"
    with pytest.raises(ApprovalError, match="already timed_out"):
        record_decision(mlflow_server, run, "approved", "alice")


def test_a_failed_gate_needs_a_reasoned_override(tmp_path, mlflow_server, approval_candidate):
    from mlflow import MlflowClient

    name, run = approval_candidate(passed=False)
    with pytest.raises(ApprovalError, match="--override"):
        record_decision(mlflow_server, run, "approved", "alice")
    with pytest.raises(ApprovalError, match="an override needs a reason"):
        record_decision(mlflow_server, run, "approved", "alice", override=True)
    decision = record_decision(
        mlflow_server, run, "approved", "alice", "recall dip is label noise", override=True
    )
    assert decision.approved and decision.override and decision.gate_passed is False
    tags = MlflowClient(mlflow_server).search_model_versions(f"name = '{name}'")[0].tags
    assert tags["approval.override"] == "true" and tags["approval.by"] == "alice"
    assert tags["approval.comment"] == "recall dip is label noise"


def test_unknown_run_is_reported(mlflow_server):
    with pytest.raises(ApprovalError, match="has no candidate"):
        record_decision(mlflow_server, "no-such-run", "approved", "alice")


def _approval_inputs(tmp_path, passed: bool = True):
    """A gate decision and a model folder, as the approval step receives them."""
    run = f"r-{uuid.uuid4().hex[:6]}"
    decision_dir = tmp_path / run / "decision"
    decision_dir.mkdir(parents=True)
    (decision_dir / "decision.json").write_text(json.dumps({"passed": passed}))
    model = tmp_path / run / "model"
    model.mkdir()
    (model / "model.keras").write_bytes(b"weights")
    (model / "model_info.json").write_text("{}")
    return decision_dir, model, run


def _approve_step(tmp_path, tracking_uri, model_name, approval, *, passed=True, timeout_s=60):
    decision_dir, model, run = _approval_inputs(tmp_path, passed)
    gate = GateConfig(approval=approval, approval_timeout_s=timeout_s, approval_poll_s=0.2)
    return run_approval(
        decision_dir,
        model,
        gate,
        tracking_uri=tracking_uri,
        model_name=model_name,
        pipeline_run=run,
        output_dir=tmp_path / run / "record",
    )


@pytest.mark.parametrize(("passed", "status"), [(True, "approved"), (False, "rejected")])
def test_auto_mode_decides_from_the_gate(tmp_path, mlflow_server, passed, status):
    result = _approve_step(
        tmp_path, mlflow_server, f"m-{uuid.uuid4().hex[:6]}", "auto", passed=passed
    )
    assert result.status == status and result.by == "auto"
    record = json.loads((tmp_path / result.pipeline_run / "record" / "approval.json").read_text())
    assert record["status"] == status and record["policy"] == "auto"


def test_the_first_manual_run_fixes_manual_for_a_later_auto_run(tmp_path, mlflow_server):
    """Issue 10: a drift-triggered run configured `auto` deployed a model made under manual."""
    from mlflow import MlflowClient

    name = f"m-{uuid.uuid4().hex[:6]}"
    first = _approve_step(tmp_path, mlflow_server, name, "manual", timeout_s=0.5)
    assert first.status == "timed_out" and first.policy == "manual"
    assert "stored as the policy of" in first.policy_source
    policy = get_approval_policy(connect(mlflow_server), name)
    assert policy.approval == "manual" and policy.set_by == f"pipeline run {first.pipeline_run}"

    started = time.monotonic()
    later = _approve_step(tmp_path, mlflow_server, name, "auto", timeout_s=1.0)
    assert later.status == "timed_out" and not later.approved and later.by != "auto"
    assert time.monotonic() - started >= 1.0
    assert later.policy == "manual"
    assert later.policy_source.startswith(
        f"model policy manual, set by pipeline run {first.pipeline_run} at "
    )
    assert "gate.approval=auto cannot lower it" in later.policy_source
    record = json.loads((tmp_path / later.pipeline_run / "record" / "approval.json").read_text())
    assert record["status"] == "timed_out" and record["policy_source"] == later.policy_source
    tags = MlflowClient(mlflow_server).get_model_version(name, later.model_version).tags
    assert tags["approval.policy"] == "manual"
    assert tags["approval.policy_source"] == later.policy_source


def test_an_auto_run_waits_for_a_person_under_a_manual_policy_set_by_hand(tmp_path, mlflow_server):
    import threading

    name = f"m-{uuid.uuid4().hex[:6]}"
    set_model_policy(mlflow_server, name, "manual", "alice", by="lead")
    result: list = []
    thread = threading.Thread(
        target=lambda: result.append(_approve_step(tmp_path, mlflow_server, name, "auto"))
    )
    thread.start()
    client = connect(mlflow_server)
    deadline = time.monotonic() + 30
    while not (waiting := list_versions(client, name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    run = waiting[0].tags["tumorflow.pipeline_run"]
    time.sleep(0.5)
    assert thread.is_alive(), "an auto run skipped the model's manual policy"
    with pytest.raises(ApprovalError, match=r"mallory may not approve .*only alice"):
        record_decision(mlflow_server, run, "approved", "mallory")
    assert thread.is_alive()
    record_decision(mlflow_server, run, "approved", "alice", "checked")
    thread.join(timeout=30)
    (decision,) = result
    assert decision.approved and decision.by == "alice"
    assert decision.policy_source.startswith("model policy manual, set by lead at ")


def test_a_policy_that_cannot_be_read_fails_the_step(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    name = f"m-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(mlflow_server)
    client.create_registered_model(name)
    client.set_registered_model_tag(name, "tumorflow.approval_policy", "sometimes")
    with pytest.raises(RegistryError, match=r"unusable tag tumorflow\.approval_policy"):
        _approve_step(tmp_path, mlflow_server, name, "auto")
    with pytest.raises(RegistryError, match="not reachable"):
        _approve_step(tmp_path, "http://127.0.0.1:9", name, "auto")


def test_the_approval_report_links_to_the_runs_review_page(tmp_path):
    """The pipeline UI shows the approval task's Markdown: the outcome and the console's page of
    that run, on the configured base URL."""
    import re

    from kfp import dsl

    from tumorflow.pipelines.steps import approval

    decision = tmp_path / "decision"
    decision.mkdir()
    (decision / "decision.json").write_text(json.dumps({"passed": True, "rules": []}))
    report = tmp_path / "approval-report.md"
    approved = approval.python_func(
        decision=dsl.Artifact(uri=str(decision)),
        model=dsl.Model(uri=str(tmp_path / "model")),
        gate_config=GateConfig(approval="auto").model_dump(),
        tracking_uri="",
        model_name="kidney-ct",
        model_base_path=str(tmp_path / "models"),
        pipeline_run="retrain-20261201-1405",
        trigger_reason="",
        record=dsl.Artifact(uri=str(tmp_path / "record")),
        report=dsl.Markdown(uri=str(report)),
        console_base_url="https://console.example.org/review/",
    )
    assert approved
    text = report.read_text()
    link = re.search(r"\[[^\]]+\]\(([^)]+)\)", text)
    assert link and link.group(1) == (
        "https://console.example.org/review/runs/retrain-20261201-1405"
    )
    assert "approved" in text.splitlines()[0] and "| decided by | auto |" in text
