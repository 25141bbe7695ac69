from __future__ import annotations

import json
import time
import uuid

import pytest

from tumorflow.components.approval import (
    ApprovalError,
    record_decision,
    run_approval,
    wait_for_approval,
)
from tumorflow.core.config import GateConfig

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize(("passed", "status"), [(True, "approved"), (False, "rejected")])
def test_auto_mode_decides_from_the_gate(tmp_path, mlflow_server, passed, status):
    decision_dir = tmp_path / "decision"
    decision_dir.mkdir()
    (decision_dir / "decision.json").write_text(json.dumps({"passed": passed}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.keras").write_bytes(b"weights")
    (model / "model_info.json").write_text("{}")
    result = run_approval(
        decision_dir,
        model,
        GateConfig(approval="auto"),
        tracking_uri=mlflow_server,
        model_name=f"m-{uuid.uuid4().hex[:6]}",
        pipeline_run=f"r-{uuid.uuid4().hex[:6]}",
        output_dir=tmp_path / "record",
    )
    assert result.status == status and result.by == "auto"
    assert json.loads((tmp_path / "record" / "approval.json").read_text())["status"] == status
