"""Human approval between the gate and deploy, stored as tags on the candidate MLflow model version.

The pipeline registers a candidate per run (`approval.status=pending`); in `manual` mode it polls
those tags until `tumorflow approve RUN` or `tumorflow reject RUN` records a decision, or the
timeout passes. A failed gate can only be approved with an explicit, reasoned override.

The mode is the stricter of the registered model's approval policy and the run's `gate.approval`
(`components/release/approval_rules.py`), and only the policy's approvers may decide.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tumorflow.components.release import registry
from tumorflow.components.release.approval_rules import (
    APPROVAL_MODES,
    AUTO,
    MANUAL,
    ApprovalError,
    ApprovalPolicy,
    EffectivePolicy,
    check_approver,
    effective_policy,
)
from tumorflow.components.release.deploy import approval_tags
from tumorflow.core import serving_layout
from tumorflow.core.config import GateConfig

log = logging.getLogger(__name__)

PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"
TIMED_OUT = "timed_out"
# The approval step's Markdown report, beside approval.json.
APPROVAL_REPORT = "approval.md"


@dataclass
class ApprovalDecision:
    """The approval of one pipeline run's candidate: who decided what, when and why."""

    status: str
    pipeline_run: str
    model_name: str | None = None
    model_version: str | None = None
    by: str | None = None
    at: str | None = None
    comment: str | None = None
    override: bool = False
    gate_passed: bool | None = None
    reason: str = ""
    # The approval mode this run obeyed and where it came from ("model policy manual, set by ...").
    policy: str | None = None
    policy_source: str | None = None

    @property
    def approved(self) -> bool:
        return self.status == APPROVED

    def summary(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self, review_url: str = "") -> str:
        """The approval task's report in the pipeline UI: the outcome, who decided and why, and
        the link to the run's review page in the console, where a person decides."""
        lines = [f"## Approval of run `{self.pipeline_run}`: {self.status}", ""]
        if review_url:
            lines += [f"[Review the evidence and decide in the console]({review_url})", ""]
        lines += ["| | |", "|---|---|"]
        for label, value in (
            (
                "model",
                f"{self.model_name} version {self.model_version}"
                if self.model_version
                else self.model_name,
            ),
            ("gate passed", {True: "yes", False: "no", None: "—"}[self.gate_passed]),
            ("decided by", self.by),
            ("at", self.at),
            ("override", "yes" if self.override else None),
            ("reason", self.reason),
            ("policy", self.policy_source or self.policy),
        ):
            if value:
                lines.append(f"| {label} | {str(value).replace('|', '/')} |")
        return "\n".join(lines) + "\n"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _from_tags(model_version: Any, pipeline_run: str) -> ApprovalDecision:
    tags = model_version.tags
    gate = tags.get(registry.TAG_GATE_PASSED)
    return ApprovalDecision(
        status=tags.get("approval.status", PENDING),
        pipeline_run=pipeline_run,
        model_name=model_version.name,
        model_version=model_version.version,
        by=tags.get("approval.by"),
        at=tags.get("approval.at"),
        comment=tags.get("approval.comment"),
        override=tags.get("approval.override") == "true",
        gate_passed=None if gate is None else gate == "true",
        policy=tags.get(registry.TAG_APPROVAL_POLICY_APPLIED),
        policy_source=tags.get(registry.TAG_APPROVAL_POLICY_SOURCE),
    )


def _policy_tags(decision: ApprovalDecision) -> dict[str, str]:
    return {
        key: value
        for key, value in (
            (registry.TAG_APPROVAL_POLICY_APPLIED, decision.policy),
            (registry.TAG_APPROVAL_POLICY_SOURCE, decision.policy_source),
        )
        if value
    }


def _set(client: Any, decision: ApprovalDecision) -> None:
    """Write the approval tags, status last: a poller that sees the status sees who/when/why."""
    tags = approval_tags(decision.summary()) | _policy_tags(decision)
    for key, value in sorted(tags.items(), key=lambda item: item[0] == "approval.status"):
        client.set_model_version_tag(decision.model_name, decision.model_version, key, value)


def record_decision(
    tracking_uri: str,
    pipeline_run: str,
    status: str,
    by: str | None = None,
    comment: str | None = None,
    *,
    override: bool = False,
    model_name: str | None = None,
) -> ApprovalDecision:
    """Record `approved` or `rejected` on the candidate of `pipeline_run` (tags on its version).

    `by` is the identity that decides and is recorded: the OS user by default, which is what
    `tumorflow approve|reject` passes; the review console (a later issue) passes the identity it
    authenticated through this same function. Refuses an identity that the model's approval
    policy does not list as an approver, a rejection or an override without a reason, approving
    a failed gate without `override`, and deciding a run that is no longer pending.
    """
    by = by or getpass.getuser()
    if status not in (APPROVED, REJECTED):
        raise ApprovalError(f"status must be {APPROVED} or {REJECTED}, not {status!r}")
    if (status == REJECTED or override) and not (comment and comment.strip()):
        what = "a rejection" if status == REJECTED else "an override"
        raise ApprovalError(f"{what} needs a reason: pass --reason '...'")
    client = registry.connect(tracking_uri)
    model_version = registry.find_version_by_run(client, pipeline_run, model_name)
    if model_version is None:
        raise ApprovalError(
            f"pipeline run {pipeline_run!r} has no candidate model version"
            + (f" of {model_name}" if model_name else "")
            + "; check the run id (`tumorflow status` lists recent runs)"
        )
    check_approver(
        registry.get_approval_policy(client, model_version.name),
        by,
        model_version.name,
        "approve" if status == APPROVED else "reject",
    )
    current = _from_tags(model_version, pipeline_run)
    if current.status != PENDING:
        raise ApprovalError(
            f"run {pipeline_run} was already {current.status} by {current.by} at {current.at}; "
            "start a new run to decide again"
        )
    if status == APPROVED and current.gate_passed is False and not override:
        raise ApprovalError(
            f"the gate failed for run {pipeline_run}; approve it only with "
            "--override --reason '...', which is recorded"
        )
    decision = ApprovalDecision(
        status=status,
        pipeline_run=pipeline_run,
        model_name=model_version.name,
        model_version=model_version.version,
        by=by,
        at=_now(),
        comment=comment,
        override=override,
        gate_passed=current.gate_passed,
        reason=f"{status} by {by}" + (f": {comment}" if comment else ""),
        policy=current.policy,
        policy_source=current.policy_source,
    )
    _set(client, decision)
    log.info("run %s %s by %s (version %s)", pipeline_run, status, by, model_version.version)
    return decision


def set_model_policy(
    tracking_uri: str,
    model_name: str,
    approval: str | None = None,
    approvers: str | None = None,
    *,
    by: str | None = None,
) -> ApprovalPolicy:
    """Store the approval policy of `model_name` (`tumorflow policy set`); return it.

    `approval` or `approvers` left None keep the stored value (`approvers=""`: anyone may approve).
    `by` is recorded as who set it: the OS user by default; it is not a command-line field.
    """
    client = registry.connect(tracking_uri)
    stored = registry.get_approval_policy(client, model_name)
    if approval is None and stored is None:
        raise ApprovalError(
            f"{model_name} has no approval policy yet: pass --approval {' or '.join(APPROVAL_MODES)}"
        )
    kept = stored.approvers if stored is not None else ()
    policy = ApprovalPolicy(
        approval or stored.approval,
        kept if approvers is None else approvers,
        set_by=by or getpass.getuser(),
        set_at=_now(),
    )
    return registry.set_approval_policy(client, model_name, policy)


def wait_for_approval(
    tracking_uri: str,
    model_name: str,
    pipeline_run: str,
    timeout_s: float,
    poll_s: float,
    *,
    mode: str = MANUAL,
    policy_source: str | None = None,
    review_url: str = "",
) -> ApprovalDecision:
    """Poll the candidate's tags until approved or rejected; on timeout record `timed_out`.

    In `auto` mode a passing gate is approved at once (by "auto") and a failing one is not.
    `mode` and `policy_source` (why this mode) are recorded on the candidate before it waits;
    the log line that says it waits names `review_url`, the run's page in the console.
    """
    client = registry.connect(tracking_uri)
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        model_version = registry.find_version_by_run(client, pipeline_run, model_name)
        if model_version is None:
            raise ApprovalError(f"run {pipeline_run} has no candidate version of {model_name}")
        current = _from_tags(model_version, pipeline_run)
        if policy_source and current.status == PENDING and current.policy_source != policy_source:
            current.policy, current.policy_source = mode, policy_source
            for key, value in _policy_tags(current).items():
                client.set_model_version_tag(model_name, model_version.version, key, value)
        if current.status in (APPROVED, REJECTED, TIMED_OUT):
            current.reason = f"{current.status} by {current.by}" + (
                f": {current.comment}" if current.comment else ""
            )
            return current
        if mode == AUTO:
            if current.gate_passed:
                current.status, current.by, current.at = APPROVED, "auto", _now()
                current.reason = "approved automatically: the gate passed"
            else:
                current.status, current.by, current.at = REJECTED, "auto", _now()
                current.comment = current.reason = (
                    "the gate failed and approval is auto; re-run with gate.approval=manual "
                    "to allow an override"
                )
            _set(client, current)
            return current
        if time.monotonic() >= deadline:
            current.status, current.by, current.at = TIMED_OUT, "tumorflow", _now()
            current.comment = current.reason = (
                f"no decision within {timeout_s:g}s; nothing deployed"
            )
            _set(client, current)
            return current
        if not announced:
            log.info(
                "waiting up to %gs for `tumorflow approve %s` or `tumorflow reject %s --reason ...`"
                " (%s)%s",
                timeout_s,
                pipeline_run,
                pipeline_run,
                current.policy_source or "manual approval",
                f"; review it at {review_url}" if review_url else "",
            )
            announced = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def _resolve(
    gate: GateConfig,
    tracking_uri: str | None,
    model_name: str,
    pipeline_run: str,
    model_base_path: str | None,
) -> EffectivePolicy:
    """The run's effective policy, from the registry when there is one, else from what is served."""
    if tracking_uri:
        stored = registry.get_approval_policy(registry.connect(tracking_uri), model_name)
        return effective_policy(
            stored,
            gate.approval,
            model_name=model_name,
            registry_readable=True,
            stored_by=f"pipeline run {pipeline_run}",
            now=_now(),
        )
    served = serving_layout.served_version(model_base_path, model_name) if model_base_path else None
    return effective_policy(
        None,
        gate.approval,
        model_name=model_name,
        registry_readable=False,
        served_version=served.version if served else None,
        served_known=bool(model_base_path),
    )


def run_approval(
    decision_dir: Path,
    model_dir: Path,
    gate: GateConfig,
    *,
    tracking_uri: str | None,
    model_name: str,
    pipeline_run: str,
    output_dir: Path,
    model_base_path: str | None = None,
    trigger_reason: str = "",
    review_url: str = "",
) -> ApprovalDecision:
    """The approval step: register the candidate, wait (manual) or decide (auto), write
    approval.json and approval.md (the report linking to `review_url`, the console's page).

    The mode is the stricter of the model's stored policy and `gate.approval`; a model without a
    stored policy gets the run's. Without a registry (`tracking_uri` None) the run goes ahead
    only where `model_base_path` shows that nothing of the model is served yet.
    """
    decision = json.loads((Path(decision_dir) / "decision.json").read_text())
    policy = _resolve(gate, tracking_uri, model_name, pipeline_run, model_base_path)
    if policy.approval != gate.approval:
        log.info("gate.approval=%s, but %s", gate.approval, policy.source)
    if tracking_uri:
        registry.register_candidate(
            tracking_uri,
            model_name,
            model_dir,
            decision,
            pipeline_run,
            trigger_reason=trigger_reason,
        )
        if policy.to_store is not None:
            client = registry.connect(tracking_uri)
            if registry.get_approval_policy(client, model_name) is None:
                registry.set_approval_policy(client, model_name, policy.to_store)
        result = wait_for_approval(
            tracking_uri,
            model_name,
            pipeline_run,
            gate.approval_timeout_s,
            gate.approval_poll_s,
            mode=policy.approval,
            policy_source=policy.source,
            review_url=review_url,
        )
    elif policy.approval == MANUAL:
        raise ApprovalError("manual approval needs an MLflow tracking URI to record decisions on")
    else:
        passed = bool(decision["passed"])
        result = ApprovalDecision(
            status=APPROVED if passed else REJECTED,
            pipeline_run=pipeline_run,
            model_name=model_name,
            by="auto",
            at=_now(),
            gate_passed=passed,
            reason="approved automatically: the gate passed" if passed else "the gate failed",
            policy=policy.approval,
            policy_source=policy.source,
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "approval.json").write_text(json.dumps(result.summary(), indent=2))
    (output_dir / APPROVAL_REPORT).write_text(result.markdown(review_url))
    log.info("approval for run %s: %s (%s)", pipeline_run, result.reason, result.policy_source)
    return result
