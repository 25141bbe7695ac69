"""Human approval between the gate and deploy, stored as tags on the candidate MLflow model version.

The pipeline registers a candidate per run (`approval.status=pending`); in `manual` mode it polls
those tags until `tumorflow approve RUN` or `tumorflow reject RUN` records a decision, or the
timeout passes. A failed gate can only be approved with an explicit, reasoned override.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tumorflow.components import registry
from tumorflow.components.deploy import approval_tags
from tumorflow.core.config import GateConfig
from tumorflow.core.errors import TumorflowError

log = logging.getLogger(__name__)

PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"
TIMED_OUT = "timed_out"


class ApprovalError(TumorflowError):
    """An approval cannot be recorded as asked (no candidate, already decided, missing reason)."""


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

    @property
    def approved(self) -> bool:
        return self.status == APPROVED

    def summary(self) -> dict[str, Any]:
        return asdict(self)


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
    )


def _set(client: Any, decision: ApprovalDecision) -> None:
    """Write the approval tags, status last: a poller that sees the status sees who/when/why."""
    tags = approval_tags(decision.summary())
    for key, value in sorted(tags.items(), key=lambda item: item[0] == "approval.status"):
        client.set_model_version_tag(decision.model_name, decision.model_version, key, value)


def record_decision(
    tracking_uri: str,
    pipeline_run: str,
    status: str,
    by: str,
    comment: str | None = None,
    *,
    override: bool = False,
    model_name: str | None = None,
) -> ApprovalDecision:
    """Record `approved` or `rejected` on the candidate of `pipeline_run` (tags on its version).

    Refuses a rejection without a reason, an override without a reason, approving a failed gate
    without `override`, and deciding a run that is no longer pending.
    """
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
    )
    _set(client, decision)
    log.info("run %s %s by %s (version %s)", pipeline_run, status, by, model_version.version)
    return decision


def wait_for_approval(
    tracking_uri: str,
    model_name: str,
    pipeline_run: str,
    timeout_s: float,
    poll_s: float,
    *,
    mode: str = "manual",
) -> ApprovalDecision:
    """Poll the candidate's tags until approved or rejected; on timeout record `timed_out`.

    In `auto` mode a passing gate is approved at once (by "auto") and a failing one is not.
    """
    client = registry.connect(tracking_uri)
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        model_version = registry.find_version_by_run(client, pipeline_run, model_name)
        if model_version is None:
            raise ApprovalError(f"run {pipeline_run} has no candidate version of {model_name}")
        current = _from_tags(model_version, pipeline_run)
        if current.status in (APPROVED, REJECTED, TIMED_OUT):
            current.reason = f"{current.status} by {current.by}" + (
                f": {current.comment}" if current.comment else ""
            )
            return current
        if mode == "auto":
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
                "waiting up to %gs for `tumorflow approve %s` or `tumorflow reject %s --reason ...`",
                timeout_s,
                pipeline_run,
                pipeline_run,
            )
            announced = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def run_approval(
    decision_dir: Path,
    model_dir: Path,
    gate: GateConfig,
    *,
    tracking_uri: str | None,
    model_name: str,
    pipeline_run: str,
    output_dir: Path,
) -> ApprovalDecision:
    """The approval step: register the candidate, wait (manual) or decide (auto), write approval.json."""
    decision = json.loads((Path(decision_dir) / "decision.json").read_text())
    if tracking_uri:
        registry.register_candidate(tracking_uri, model_name, model_dir, decision, pipeline_run)
        result = wait_for_approval(
            tracking_uri,
            model_name,
            pipeline_run,
            gate.approval_timeout_s,
            gate.approval_poll_s,
            mode=gate.approval,
        )
    elif gate.approval == "manual":
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
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "approval.json").write_text(json.dumps(result.summary(), indent=2))
    log.info("approval for run %s: %s", pipeline_run, result.reason)
    return result
