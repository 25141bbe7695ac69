"""The approval rules without MLflow: which policy a run obeys, and who may decide."""

from __future__ import annotations

import pytest

from tumorflow.components.release.approval_rules import (
    ApprovalError,
    ApprovalPolicy,
    check_approver,
    effective_policy,
    parse_approvers,
)

MANUAL_BY_ALICE = ApprovalPolicy("manual", ("alice", "bob"), set_by="alice", set_at="T1")
AUTO_BY_OPS = ApprovalPolicy("auto", set_by="ops", set_at="T2")


def _resolve(stored, run_approval, **kwargs):
    kwargs.setdefault("registry_readable", True)
    return effective_policy(stored, run_approval, model_name="kidney-ct", **kwargs)


def test_a_run_configured_auto_cannot_lower_a_stored_manual_policy():
    policy = _resolve(MANUAL_BY_ALICE, "auto")
    assert policy.approval == "manual"
    assert policy.source.startswith("model policy manual, set by alice at T1")
    assert "gate.approval=auto cannot lower it" in policy.source
    assert policy.approvers == ("alice", "bob")
    assert policy.to_store is None


def test_a_run_configured_manual_is_stricter_than_a_stored_auto_policy():
    policy = _resolve(AUTO_BY_OPS, "manual")
    assert policy.approval == "manual"
    assert policy.source == (
        "run config gate.approval=manual, stricter than the model policy auto, set by ops at T2"
    )
    assert policy.to_store is None


@pytest.mark.parametrize(
    ("stored", "run", "expected"),
    [
        (AUTO_BY_OPS, "auto", "auto"),
        (AUTO_BY_OPS, "manual", "manual"),
        (MANUAL_BY_ALICE, "auto", "manual"),
        (MANUAL_BY_ALICE, "manual", "manual"),
    ],
)
def test_the_stricter_of_model_and_run_wins(stored, run, expected):
    assert _resolve(stored, run).approval == expected


@pytest.mark.parametrize("run", ["auto", "manual"])
def test_the_first_registration_takes_the_runs_policy_and_stores_it(run):
    policy = _resolve(None, run, stored_by="pipeline run r1", now="T0")
    assert policy.approval == run
    assert policy.to_store == ApprovalPolicy(run, (), set_by="pipeline run r1", set_at="T0")
    assert "stored as the policy of kidney-ct" in policy.source
    # and the next run, configured auto, obeys what the first run stored
    assert _resolve(policy.to_store, "auto").approval == run


def test_without_a_registry_a_served_model_is_not_assumed_auto():
    with pytest.raises(ApprovalError, match="version 3 of kidney-ct is served"):
        _resolve(None, "auto", registry_readable=False, served_version=3)
    with pytest.raises(ApprovalError, match="nothing tells whether kidney-ct is already served"):
        _resolve(None, "auto", registry_readable=False, served_known=False)


def test_without_a_registry_a_first_deployment_follows_the_run():
    policy = _resolve(None, "auto", registry_readable=False, served_version=None)
    assert policy.approval == "auto" and "nothing served yet" in policy.source
    assert policy.to_store is None


def test_an_unknown_approval_mode_is_refused():
    with pytest.raises(ApprovalError, match="auto or manual, not 'sometimes'"):
        _resolve(None, "sometimes")
    with pytest.raises(ApprovalError, match="auto or manual, not 'MANUAL'"):
        ApprovalPolicy("MANUAL")


def test_only_listed_approvers_may_decide():
    check_approver(MANUAL_BY_ALICE, "bob", "kidney-ct")
    with pytest.raises(ApprovalError) as refused:
        check_approver(MANUAL_BY_ALICE, "mallory", "kidney-ct", "reject")
    message = str(refused.value)
    assert message.startswith("mallory may not reject kidney-ct")
    assert "alice, bob" in message and "\n" not in message


@pytest.mark.parametrize("policy", [None, AUTO_BY_OPS, ApprovalPolicy("manual")])
def test_anyone_may_decide_when_no_approvers_are_listed(policy):
    check_approver(policy, "anyone-at-all", "kidney-ct")


def test_a_decision_needs_an_identity():
    with pytest.raises(ApprovalError, match="identity"):
        check_approver(None, " ", "kidney-ct")


def test_approvers_are_parsed_from_a_comma_separated_list():
    assert parse_approvers(" alice, bob,,alice ,") == ("alice", "bob")
    assert parse_approvers("") == () == parse_approvers(None)
    assert ApprovalPolicy("manual", "carol,dave").approvers == ("carol", "dave")


def _decision_dir(tmp_path, passed: bool = True):
    import json

    folder = tmp_path / "decision"
    folder.mkdir()
    (folder / "decision.json").write_text(json.dumps({"passed": passed}))
    return folder


def test_the_approval_step_without_a_registry_refuses_to_deploy_over_a_served_model(tmp_path):
    from tumorflow.components.release.approval import run_approval
    from tumorflow.core.config import GateConfig

    base = tmp_path / "models"
    arguments = dict(
        tracking_uri=None, model_name="kidney-ct", pipeline_run="r1", output_dir=tmp_path / "out"
    )
    decision = _decision_dir(tmp_path)
    first = run_approval(
        decision, tmp_path, GateConfig(approval="auto"), model_base_path=str(base), **arguments
    )
    assert first.approved and first.policy == "auto" and "nothing served" in first.policy_source
    (base / "kidney-ct" / "1").mkdir(parents=True)
    (base / "kidney-ct" / "1" / "saved_model.pb").write_bytes(b"served")
    with pytest.raises(ApprovalError, match="version 1 of kidney-ct is served"):
        run_approval(
            decision, tmp_path, GateConfig(approval="auto"), model_base_path=str(base), **arguments
        )
    with pytest.raises(ApprovalError, match="nothing tells whether kidney-ct"):
        run_approval(decision, tmp_path, GateConfig(approval="auto"), **arguments)
