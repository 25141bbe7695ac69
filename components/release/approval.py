"""Human approval between the gate and deploy: signed decisions about the candidate's exact artifact.

The pipeline registers a candidate per run; in `manual` mode it polls the candidate's model
version until a signed decision (`tumorflow approve|reject RUN`, the console) that verifies against
the trust root arrives, or the timeout passes. A decision counts only when its signature verifies,
its signer is an approver of the model in the trust root, and it is about this candidate (registry
version, SavedModel digest, gate decision digest). Everything else on the version (the plain
`approval.*` tags, a non-approver's or a replayed record) is logged as refused, with why.

The registry is untrusted storage: it holds the signed records (tag `decision.<seq>.<action>`) and
display tags written after verification. The mode is the stricter of the trust root's policy for
the model and the run's `gate.approval`; a failed gate is approved only by a signed override.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tumorflow.components.progress import approval_wait_line
from tumorflow.components.release import registry
from tumorflow.components.release.approval_rules import (
    APPROVAL_MODES,
    AUTO,
    MANUAL,
    ApprovalError,
    stricter,
)
from tumorflow.components.release.deploy import (
    AUDIT_WHAT,
    approval_tags,
    audit_event,
    candidate_export,
)
from tumorflow.components.release.signing import SignatureInvalid, SignedRecord, Signer
from tumorflow.components.release.trust_root import (
    DecisionRefused,
    TrustRoot,
    VerifiedDecision,
    sign_decision,
    utc_now,
)
from tumorflow.core.artifacts import APPROVAL_FILE, DECISION_FILE
from tumorflow.core.config import GateConfig

log = logging.getLogger(__name__)

PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"
TIMED_OUT = "timed_out"
# The approval step's Markdown report, beside approval.json.
APPROVAL_REPORT = "approval.md"
# The actions a decision about a waiting candidate may take, and the status each one gives.
DECIDING_ACTIONS = {
    "approve": APPROVED,
    "override": APPROVED,
    "auto_approve": APPROVED,
    "reject": REJECTED,
}


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
    # The signed decision(s) that hold ({"record", "signature"}): what deploy verifies again.
    records: list[dict[str, Any]] = field(default_factory=list)
    # One line per decision found on the candidate that did not hold, with why.
    refused: list[str] = field(default_factory=list)

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
            ("signed", self.records[-1]["record"]["signed_at"] if self.records else None),
        ):
            if value:
                lines.append(f"| {label} | {str(value).replace('|', '/')} |")
        if self.refused:
            lines += ["", "### Refused", ""] + [f"- {why}" for why in self.refused]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Candidate:
    """What a decision must be about, computed from the run's own artifacts (never from tags)."""

    model_name: str
    serving_digest: str
    decision_digest: str
    dataset_version: str | None = None


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def candidate_of(model_name: str, model_dir: Path, decision_path: Path) -> Candidate:
    """The candidate's serving digest (recorded by the train step) and its gate decision's digest."""
    from tumorflow.components.training.export import SAVED_MODEL_DIGEST

    _, digests = candidate_export(Path(model_dir))
    decision = json.loads(Path(decision_path).read_text())
    return Candidate(
        model_name,
        digests[SAVED_MODEL_DIGEST],
        file_digest(decision_path),
        decision.get("dataset_version"),
    )


def _now() -> str:
    return utc_now()


def verify_decisions(
    tags: dict[str, str],
    trust: TrustRoot,
    candidate: Candidate,
    model_version: str,
    actions: tuple[str, ...] = tuple(DECIDING_ACTIONS),
) -> tuple[list[VerifiedDecision], list[str]]:
    """The decisions on a version that hold for this candidate, and why each other one does not."""
    verified, refused = [], []
    for tag, value in registry.decision_tags(tags):
        try:
            signed = SignedRecord.from_json(value)
            verified.append(
                trust.verify(
                    signed,
                    action=actions,
                    model_name=candidate.model_name,
                    model_version=model_version,
                    serving_digest=candidate.serving_digest,
                    decision_digest=candidate.decision_digest,
                )
            )
        except (SignatureInvalid, DecisionRefused) as exc:
            refused.append(f"{tag}: {exc}")
    status = tags.get("approval.status")
    if status in (APPROVED, REJECTED) and not verified:
        refused.append(
            f"approval.status={status} (approval.by={tags.get('approval.by', '?')}) is a plain "
            "registry tag, not a signed decision"
        )
    return verified, refused


def record_decision(
    tracking_uri: str,
    pipeline_run: str,
    status: str,
    comment: str | None = None,
    *,
    signer: Signer,
    trust: TrustRoot,
    identity: str | None = None,
    authenticated_via: str = "ssh key",
    override: bool = False,
    model_name: str | None = None,
    audit_log: str = "",
) -> ApprovalDecision:
    """Sign `approved` or `rejected` for the candidate of `pipeline_run` and store it on its version.

    The record is signed by `signer` for `identity` (the signer's own name; a console's delegate
    key names the user it authenticated and says how in `authenticated_via`), and verified against
    the trust root before it is stored, so a non-approver learns at once. The waiting run verifies
    it again against the artifacts it holds. Refuses a rejection or an override without a reason,
    approving a failed gate without `override`, and deciding a run that is no longer pending.
    """
    identity = identity or signer.identity
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
    tags = model_version.tags
    name, version = model_version.name, model_version.version
    # The digests the candidate was registered with: what the person decides about. The waiting
    # run checks them against the artifacts it holds.
    candidate = Candidate(
        name,
        tags.get(registry.TAG_CANDIDATE_SERVING_DIGEST, ""),
        tags.get(registry.TAG_CANDIDATE_DECISION_DIGEST, ""),
        tags.get(registry.TAG_CANDIDATE_DATASET_VERSION) or None,
    )
    decided, _ = verify_decisions(tags, trust, candidate, version)
    if decided or tags.get("approval.status") == TIMED_OUT:
        first = decided[0] if decided else None
        what = (
            f"{DECIDING_ACTIONS[first.record['action']]} by {first.identity} at "
            f"{first.record['signed_at']}"
            if first
            else f"timed out at {tags.get('approval.at')}"
        )
        raise ApprovalError(
            f"run {pipeline_run} was already {what}; start a new run to decide again"
        )
    gate_passed = tags.get(registry.TAG_GATE_PASSED)
    if status == APPROVED and gate_passed == "false" and not override:
        raise ApprovalError(
            f"the gate failed for run {pipeline_run}; approve it only with "
            "--override --reason '...', which is recorded"
        )
    action = "reject" if status == REJECTED else ("override" if override else "approve")
    signed = sign_decision(
        signer,
        action,
        signer=identity,
        authenticated_via=authenticated_via,
        reason=comment or "",
        model_name=name,
        model_version=version,
        serving_digest=candidate.serving_digest,
        decision_digest=candidate.decision_digest,
        dataset_version=candidate.dataset_version,
        pipeline_run=pipeline_run,
    )
    try:
        trust.verify(
            signed,
            action=action,
            model_name=name,
            model_version=version,
            serving_digest=candidate.serving_digest or None,
            decision_digest=candidate.decision_digest or None,
        )
    except DecisionRefused as exc:
        raise ApprovalError(f"refused: {exc}") from None
    tag = registry.store_decision(client, name, version, signed)
    audit_event(
        audit_log,
        identity,
        AUDIT_WHAT[action],
        comment or "",
        signer=signer,
        decision=signed,
        model_name=name,
        model_version=version,
        pipeline_run=pipeline_run,
        tag=tag,
    )
    log.info("run %s %s by %s (version %s, signed)", pipeline_run, status, identity, version)
    decision = ApprovalDecision(
        status=status,
        pipeline_run=pipeline_run,
        model_name=name,
        model_version=version,
        by=identity,
        at=signed.record["signed_at"],
        comment=comment,
        override=override,
        gate_passed=None if gate_passed is None else gate_passed == "true",
        reason=f"{status} by {identity}" + (f": {comment}" if comment else ""),
        records=[{"record": signed.record, "signature": signed.signature}],
    )
    _set_display_tags(client, decision)
    return decision


def _outcome(
    verified: VerifiedDecision, pipeline_run: str, gate_passed: bool | None
) -> ApprovalDecision:
    record = verified.record
    status = DECIDING_ACTIONS[record["action"]]
    comment = record.get("reason") or None
    return ApprovalDecision(
        status=status,
        pipeline_run=pipeline_run,
        model_name=record["model_name"],
        model_version=record.get("model_version"),
        by=verified.identity,
        at=record["signed_at"],
        comment=comment,
        override=record["action"] == "override",
        gate_passed=gate_passed,
        reason=(
            "approved automatically: the gate passed"
            if record["action"] == "auto_approve"
            else f"{status} by {verified.identity}" + (f": {comment}" if comment else "")
        ),
        records=[{"record": record, "signature": verified.signed.signature}],
    )


def _set_display_tags(client: Any, decision: ApprovalDecision) -> None:
    """The verified outcome as plain tags for people and listings; nothing trusts them."""
    tags = approval_tags(decision.summary()) | {
        key: value
        for key, value in (
            (registry.TAG_APPROVAL_POLICY_APPLIED, decision.policy),
            (registry.TAG_APPROVAL_POLICY_SOURCE, decision.policy_source),
        )
        if value
    }
    ordered = dict(sorted(tags.items(), key=lambda item: item[0] == "approval.status"))
    registry.set_version_tags(client, decision.model_name, decision.model_version, ordered)


def wait_for_approval(
    tracking_uri: str,
    candidate: Candidate,
    pipeline_run: str,
    timeout_s: float,
    poll_s: float,
    *,
    trust: TrustRoot,
    mode: str = MANUAL,
    pipeline_signer: Signer | None = None,
    policy_source: str | None = None,
    review_url: str = "",
    audit_log: str = "",
) -> ApprovalDecision:
    """Poll the candidate's version until a signed decision about it holds; on timeout record
    `timed_out`. Every record that does not hold, and a plain `approval.status` tag, is logged
    (once) as refused with why.

    In `auto` mode a passing gate is approved at once by the pipeline's key (`pipeline_signer`)
    and a failing one is not.
    """
    client = registry.connect(tracking_uri)
    model_name = candidate.model_name
    deadline = time.monotonic() + timeout_s
    announced = False
    refused_seen: list[str] = []
    while True:
        model_version = registry.find_version_by_run(client, pipeline_run, model_name)
        if model_version is None:
            raise ApprovalError(f"run {pipeline_run} has no candidate version of {model_name}")
        tags = model_version.tags
        gate = tags.get(registry.TAG_GATE_PASSED)
        gate_passed = None if gate is None else gate == "true"
        verified, refused = verify_decisions(tags, trust, candidate, model_version.version)
        for why in refused:
            if why not in refused_seen:
                refused_seen.append(why)
                log.warning(
                    "refused a decision on %s version %s (run %s): %s",
                    model_name,
                    model_version.version,
                    pipeline_run,
                    why,
                )
                audit_event(
                    audit_log,
                    "pipeline",
                    "refused",
                    why,
                    model_name=model_name,
                    model_version=model_version.version,
                    pipeline_run=pipeline_run,
                )
                registry.set_version_tags(
                    client,
                    model_name,
                    model_version.version,
                    {registry.TAG_APPROVAL_REFUSED: "; ".join(refused_seen)[:5000]},
                )
        result: ApprovalDecision | None = None
        if verified:
            result = _outcome(verified[0], pipeline_run, gate_passed)
        elif mode == AUTO and gate_passed:
            signed = _sign_auto_approval(
                pipeline_signer, candidate, pipeline_run, model_version.version
            )
            registry.store_decision(client, model_name, model_version.version, signed)
            audit_event(
                audit_log,
                "pipeline",
                AUDIT_WHAT["auto_approve"],
                "the gate passed",
                signer=pipeline_signer,
                decision=signed,
                model_name=model_name,
                model_version=model_version.version,
                pipeline_run=pipeline_run,
            )
            continue
        elif mode == AUTO:
            result = ApprovalDecision(
                status=REJECTED,
                pipeline_run=pipeline_run,
                model_name=model_name,
                model_version=model_version.version,
                by="auto",
                at=_now(),
                gate_passed=False,
            )
            result.comment = result.reason = (
                "the gate failed and approval is auto; re-run with gate.approval=manual "
                "to allow an override"
            )
        elif time.monotonic() >= deadline:
            result = ApprovalDecision(
                status=TIMED_OUT,
                pipeline_run=pipeline_run,
                model_name=model_name,
                model_version=model_version.version,
                by="tumorflow",
                at=_now(),
                gate_passed=gate_passed,
            )
            result.comment = result.reason = (
                f"no signed decision within {timeout_s:g}s; nothing deployed"
                + (f" (refused: {'; '.join(refused_seen)})" if refused_seen else "")
            )
        if result is not None:
            result.policy, result.policy_source = mode, policy_source
            result.refused = refused_seen
            _set_display_tags(client, result)
            return result
        if not announced:
            log.info(
                "waiting up to %gs for `tumorflow approve %s` or `tumorflow reject %s --reason ...`"
                " (%s)%s",
                timeout_s,
                pipeline_run,
                pipeline_run,
                policy_source or "manual approval",
                f"; review it at {review_url}" if review_url else "",
            )
            # the local runner shows this event as the command that decides the run
            print(approval_wait_line(pipeline_run), flush=True)
            announced = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def resolve_mode(trust: TrustRoot, model_name: str, run_approval: str) -> tuple[str, str]:
    """The run's approval mode, the stricter of the trust root's and `gate.approval`, and why."""
    if run_approval not in APPROVAL_MODES:
        raise ApprovalError(
            f"gate.approval must be {' or '.join(APPROVAL_MODES)}, not {run_approval!r}"
        )
    trusted, approvers, _ = trust.policy(model_name)
    mode = stricter(trusted, run_approval)
    who = f" (approvers {', '.join(approvers)})" if approvers else ""
    source = f"trust root: {model_name} approval {trusted}{who}"
    if mode != trusted:
        source = f"run config gate.approval={run_approval}, stricter than the {source}"
    elif run_approval != mode:
        source += f"; the run config gate.approval={run_approval} cannot lower it"
    return mode, source


def run_approval(
    decision_dir: Path,
    model_dir: Path,
    gate: GateConfig,
    *,
    tracking_uri: str | None,
    model_name: str,
    pipeline_run: str,
    output_dir: Path,
    trust: TrustRoot,
    pipeline_signer: Signer | None = None,
    trigger_reason: str = "",
    review_url: str = "",
    audit_log: str = "",
) -> ApprovalDecision:
    """The approval step: register the candidate, wait for a signed decision (manual) or sign one
    with the pipeline key (auto, gate passed); write approval.json (with the signed records deploy
    verifies again) and approval.md (the report linking to `review_url`, the console's page).
    """
    decision_path = Path(decision_dir) / DECISION_FILE
    decision = json.loads(decision_path.read_text())
    candidate = candidate_of(model_name, Path(model_dir), decision_path)
    mode, source = resolve_mode(trust, model_name, gate.approval)
    if mode != gate.approval:
        log.info("gate.approval=%s, but %s", gate.approval, source)
    if tracking_uri:
        registry.register_candidate(
            tracking_uri,
            model_name,
            model_dir,
            decision,
            pipeline_run,
            trigger_reason=trigger_reason,
            digests={
                registry.TAG_CANDIDATE_SERVING_DIGEST: candidate.serving_digest,
                registry.TAG_CANDIDATE_DECISION_DIGEST: candidate.decision_digest,
                registry.TAG_CANDIDATE_DATASET_VERSION: candidate.dataset_version or "",
            },
        )
        result = wait_for_approval(
            tracking_uri,
            candidate,
            pipeline_run,
            gate.approval_timeout_s,
            gate.approval_poll_s,
            trust=trust,
            mode=mode,
            pipeline_signer=pipeline_signer,
            policy_source=source,
            review_url=review_url,
            audit_log=audit_log,
        )
    elif mode == MANUAL:
        raise ApprovalError("manual approval needs an MLflow tracking URI to record decisions on")
    else:
        result = _approve_without_registry(
            decision, candidate, pipeline_run, trust, pipeline_signer
        )
        result.policy, result.policy_source = mode, source
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / APPROVAL_FILE).write_text(json.dumps(result.summary(), indent=2))
    (output_dir / APPROVAL_REPORT).write_text(result.markdown(review_url))
    log.info("approval for run %s: %s (%s)", pipeline_run, result.reason, result.policy_source)
    return result


def _sign_auto_approval(
    pipeline_signer: Signer | None,
    candidate: Candidate,
    pipeline_run: str,
    model_version: str | None = None,
) -> SignedRecord:
    """Policy auto and a passing gate: the approval the pipeline's own key signs, bound to the
    candidate's digests (and its registry version, where there is a registry)."""
    if pipeline_signer is None:
        raise ApprovalError(
            "policy auto needs the pipeline's signing key: set release.pipeline_key"
        )
    version = {"model_version": model_version} if model_version is not None else {}
    return sign_decision(
        pipeline_signer,
        "auto_approve",
        signer="pipeline",
        authenticated_via="pipeline key",
        reason="the gate passed",
        model_name=candidate.model_name,
        **version,
        serving_digest=candidate.serving_digest,
        decision_digest=candidate.decision_digest,
        dataset_version=candidate.dataset_version,
        pipeline_run=pipeline_run,
    )


def _approve_without_registry(
    decision: dict[str, Any],
    candidate: Candidate,
    pipeline_run: str,
    trust: TrustRoot,
    pipeline_signer: Signer | None,
) -> ApprovalDecision:
    """Policy auto without a registry: the pipeline key signs a passing gate's approval."""
    if not decision["passed"]:
        return ApprovalDecision(
            status=REJECTED,
            pipeline_run=pipeline_run,
            model_name=candidate.model_name,
            by="auto",
            at=_now(),
            gate_passed=False,
            reason="the gate failed",
        )
    signed = _sign_auto_approval(pipeline_signer, candidate, pipeline_run)
    verified = trust.verify(
        signed,
        action="auto_approve",
        model_name=candidate.model_name,
        serving_digest=candidate.serving_digest,
        decision_digest=candidate.decision_digest,
    )
    return _outcome(verified, pipeline_run, True)
