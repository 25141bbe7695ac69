"""The approval rules as pure functions: which policy a run obeys, and who may decide.

A registered model carries its approval policy (`auto` or `manual`, and who may approve); a run's
`gate.approval` can make one run stricter but never lower the model's policy. Nothing here reads
the registry: `components/release/registry.py` stores the policy, `components/release/approval.py` applies these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tumorflow.core.errors import TumorflowError

AUTO = "auto"
MANUAL = "manual"
APPROVAL_MODES = (AUTO, MANUAL)


class ApprovalError(TumorflowError):
    """An approval cannot be recorded as asked (no candidate, already decided, missing reason,
    an identity the model's policy does not allow, a policy that cannot be read)."""


def parse_approvers(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """Identities from `alice, bob` (or a list), stripped, without blanks or repeats, in order."""
    items = text.split(",") if isinstance(text, str) else (text or ())
    return tuple(dict.fromkeys(name.strip() for name in items if name.strip()))


@dataclass(frozen=True)
class ApprovalPolicy:
    """The approval policy stored with a registered model; no `approvers` means anyone may approve."""

    approval: str
    # A comma-separated string or a list is accepted and kept as a tuple of identities.
    approvers: tuple[str, ...] = ()
    set_by: str | None = None
    set_at: str | None = None

    def __post_init__(self) -> None:
        if self.approval not in APPROVAL_MODES:
            raise ApprovalError(
                f"approval policy must be {' or '.join(APPROVAL_MODES)}, not {self.approval!r}"
            )
        object.__setattr__(self, "approvers", parse_approvers(self.approvers))

    def describe(self) -> str:
        """`model policy manual, set by alice at 2026-01-01T00:00:00+00:00`."""
        return f"model policy {self.approval}, set by {self.set_by or '?'} at {self.set_at or '?'}"


@dataclass(frozen=True)
class EffectivePolicy:
    """The approval a run obeys, why, and the policy to store on a model that has none yet."""

    approval: str
    source: str
    approvers: tuple[str, ...] = ()
    to_store: ApprovalPolicy | None = None


def stricter(first: str, second: str) -> str:
    """`manual` when either is `manual`: a person's decision is never skipped."""
    return MANUAL if MANUAL in (first, second) else AUTO


def effective_policy(
    stored: ApprovalPolicy | None,
    run_approval: str,
    *,
    model_name: str,
    registry_readable: bool,
    served_version: int | None = None,
    served_known: bool = True,
    stored_by: str = "",
    now: str = "",
) -> EffectivePolicy:
    """The stricter of the model's stored policy and the run's `gate.approval`.

    Without a stored policy the run's configuration applies; with a registry it becomes the
    model's policy (`to_store`, set by `stored_by` at `now`). Without a registry the model's
    policy is unknown, so a run may only go ahead on its own configuration when it is known that
    nothing of the model is served yet.
    """
    if run_approval not in APPROVAL_MODES:
        raise ApprovalError(
            f"gate.approval must be {' or '.join(APPROVAL_MODES)}, not {run_approval!r}"
        )
    run = f"run config gate.approval={run_approval}"
    if not registry_readable:
        if not served_known or served_version is not None:
            served = (
                f"version {served_version} of {model_name} is served"
                if served_version is not None
                else f"nothing tells whether {model_name} is already served"
            )
            raise ApprovalError(
                f"no model registry to read the approval policy of {model_name} from, and "
                f"{served}: set tracking.tracking_uri so that its policy applies"
            )
        return EffectivePolicy(run_approval, f"{run} (no registry; nothing served yet)")
    if stored is None:
        return EffectivePolicy(
            run_approval,
            f"{run} (first run with a policy: stored as the policy of {model_name})",
            to_store=ApprovalPolicy(run_approval, set_by=stored_by or None, set_at=now or None),
        )
    approval = stricter(stored.approval, run_approval)
    if approval == stored.approval:
        lowered = run_approval != approval
        source = stored.describe() + (f"; the {run} cannot lower it" if lowered else "")
    else:
        source = f"{run}, stricter than the {stored.describe()}"
    return EffectivePolicy(approval, source, stored.approvers)


def check_approver(
    policy: ApprovalPolicy | None, identity: str, model_name: str, action: str = "approve"
) -> None:
    """Refuse `identity` to `action` (approve or reject) a candidate of `model_name` when the
    model's policy names approvers and it is not one of them."""
    if not identity or not identity.strip():
        raise ApprovalError("a decision needs the identity of who makes it")
    if policy is None or not policy.approvers or identity in policy.approvers:
        return
    raise ApprovalError(
        f"{identity} may not {action} {model_name}: its approval policy allows only "
        f"{', '.join(policy.approvers)} (`tumorflow policy show {model_name}`)"
    )
