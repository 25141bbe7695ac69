"""The console's view of the audit log: the hash-chained log of `components.release.audit_log`,
as the flat events (who, when, what, why, details) its pages list."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorflow.components.release import audit_log

if TYPE_CHECKING:
    from tumorflow.components.release.signing import SignedRecord, Signer
    from tumorflow.components.release.trust_root import TrustRoot


def _flat(entry: dict[str, Any]) -> dict[str, Any]:
    decision = entry.get("decision")
    return {
        **entry.get("event", {}),
        "at": entry.get("at", ""),
        "seq": entry.get("seq"),
        "signed_by": decision["record"].get("signer") if decision else None,
        "meaning": decision["record"].get("meaning") if decision else None,
    }


def append_event(
    path: str | Path,
    who: str,
    what: str,
    why: str = "",
    *,
    signer: Signer | None = None,
    decision: SignedRecord | None = None,
    **details: Any,
) -> dict[str, Any]:
    """Append one event (who, what, why, details, and the signed decision if any) to the chained
    log; `signer` re-signs its head. Returns the event as `read_events` lists it."""
    event = {"who": who, "what": what, "why": why, **details}
    return _flat(audit_log.append(path, event, signer, decision=decision))


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every event of the log, newest first (none when it does not exist yet)."""
    return [_flat(entry) for entry in reversed(audit_log.read(path))]


def verdict(path: str | Path, trust: TrustRoot | None = None) -> audit_log.AuditVerdict:
    """Whether the log's chain and signed head hold (what `tumorflow audit verify` says)."""
    return audit_log.verify(path, trust)
