"""The approval modes and the rule that combines them: a person's decision is never skipped.

A model's mode comes from the trust root (components/release/trust_root.py); a run's
`gate.approval` can make one run stricter but never lower it.
"""

from __future__ import annotations

from tumorflow.core.errors import TumorflowError

AUTO = "auto"
MANUAL = "manual"
APPROVAL_MODES = (AUTO, MANUAL)


class ApprovalError(TumorflowError):
    """An approval cannot be recorded as asked (no candidate, already decided, missing reason,
    a signer the trust root does not allow)."""


def stricter(first: str, second: str) -> str:
    """`manual` when either is `manual`: a person's decision is never skipped."""
    return MANUAL if MANUAL in (first, second) else AUTO
