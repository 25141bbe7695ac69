"""The hash-chained audit log of release decisions, with a signed head.

The log is append-only JSON lines beside the registry (a local path or a gs:// URI). Each line is
one entry, written as canonical JSON:

    {"seq": 7, "prev": "<sha256 of line 6>", "at": "2026-12-03T10:00:00Z",
     "event": {"who": "alice", "what": "approval", ...}, "decision": {"record": ..., "signature": ...}}

`decision` is present for signed decisions (a `SignedRecord`). Beside the log, `<log>.head` holds
the head: the last entry's seq and the digest of its line, signed by whoever appended it. Changing,
removing or reordering a line breaks the chain at that line; rewriting the whole chain after it
no longer matches the signed head. `verify` names the first entry that does not hold.

Writers go through `core.storage`: gs:// with generation preconditions (a writer that lost the
race reads again and re-appends; no entry is lost), local files under a file lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorflow.components.release.signing import (
    SignatureInvalid,
    SignedRecord,
    Signer,
    canonical,
    verify_signature,
)
from tumorflow.core import storage
from tumorflow.core.errors import TumorflowError

if TYPE_CHECKING:
    from tumorflow.components.release.trust_root import TrustRoot

log = logging.getLogger(__name__)

HEAD_SUFFIX = ".head"
# The head is signed in its own namespace, so that it can never pass for a decision.
HEAD_NAMESPACE = "tumorflow-audit-head"
GENESIS = "0" * 64

# Conditional writes of a gs:// log before giving up on a busy writer.
_MAX_CONFLICTS = 20
_MAX_BACKOFF_S = 2.0


class AuditLogError(TumorflowError):
    """The audit log cannot be read or appended to."""


@dataclass
class AuditVerdict:
    """What `verify` found: ok, how many entries, the first bad one (1-based seq) and why."""

    ok: bool
    entries: int
    first_bad: int | None = None
    why: str = ""
    head_signer: str | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "first_bad": self.first_bad,
            "why": self.why,
            "head_signer": self.head_signer,
        }


def head_uri(log_uri: str | Path) -> str:
    """Where the signed head of a log lives: beside it, `<log>.head`."""
    return f"{log_uri}{HEAD_SUFFIX}"


def line_digest(line: bytes) -> str:
    """sha256 hex of one log line (without its newline): what the next entry's `prev` holds."""
    return hashlib.sha256(line).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lines(data: bytes | None) -> list[bytes]:
    return [line for line in (data or b"").split(b"\n") if line.strip()]


def _decision_dict(decision: SignedRecord | dict | str | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    if isinstance(decision, SignedRecord):
        return {"record": decision.record, "signature": decision.signature}
    if isinstance(decision, str):
        signed = SignedRecord.from_json(decision)
        return {"record": signed.record, "signature": signed.signature}
    return {"record": dict(decision["record"]), "signature": str(decision["signature"])}


def _head_payload(seq: int, digest: str) -> bytes:
    return canonical({"seq": seq, "digest": digest})


@contextlib.contextmanager
def _local_lock(log_uri: str | Path) -> Iterator[None]:
    path = Path(log_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _conditional(uri: str, write: Callable[[bytes | None, int], bool]) -> None:
    """Read `uri` with its generation and let `write` write it back conditionally; when another
    writer won in between, read again and retry (with jittered backoff)."""
    for attempt in range(_MAX_CONFLICTS):
        data, generation = storage.read_versioned(uri)
        try:
            write(data, generation)
            return
        except storage.ConcurrentWriteError:
            log.info("%s changed while it was appended to; reading it again", uri)
            # GCS allows about one write a second to one object: back off, with jitter.
            time.sleep(random.uniform(0, min(_MAX_BACKOFF_S, 0.05 * 2**attempt)))
    raise storage.ConcurrentWriteError(
        f"{uri} kept changing under {_MAX_CONFLICTS} attempts to append to it; try again"
    )


def append(
    log_uri: str | Path,
    event: dict[str, Any],
    signer: Signer | None = None,
    *,
    decision: SignedRecord | dict | str | None = None,
) -> dict[str, Any]:
    """Append one event (and the signed decision it records, if any); return the entry written.

    The head is re-signed by `signer`; without one it is written unsigned, and `verify` against a
    trust root reports that.
    """
    log_uri = str(log_uri)
    written: dict[str, Any] = {}

    def write_entry(data: bytes | None, generation: int) -> bool:
        lines = _lines(data)
        entry: dict[str, Any] = {
            "seq": len(lines) + 1,
            "prev": line_digest(lines[-1]) if lines else GENESIS,
            "at": _now(),
            "event": dict(event),
        }
        signed = _decision_dict(decision)
        if signed is not None:
            entry["decision"] = signed
        line = canonical(entry)
        storage.write_versioned(log_uri, b"\n".join([*lines, line]) + b"\n", generation)
        written.update(entry=entry, digest=line_digest(line))
        return True

    def write_head(data: bytes | None, generation: int) -> bool:
        seq = written["entry"]["seq"]
        if data and json.loads(data).get("seq", 0) >= seq:
            return True  # a later writer's head already covers this entry
        head: dict[str, Any] = {"seq": seq, "digest": written["digest"]}
        if signer is not None:
            head.update(
                signer=signer.identity,
                public_key=signer.public_key,
                signed_at=written["entry"]["at"],
                signature=signer.sign(_head_payload(seq, written["digest"]), HEAD_NAMESPACE),
            )
        storage.write_versioned(head_uri(log_uri), canonical(head) + b"\n", generation)
        return True

    if storage.is_remote(log_uri):
        _conditional(log_uri, write_entry)
        _conditional(head_uri(log_uri), write_head)
    else:
        with _local_lock(log_uri):
            write_entry(*storage.read_versioned(log_uri))
            write_head(*storage.read_versioned(head_uri(log_uri)))
    return written["entry"]


def read(log_uri: str | Path) -> list[dict[str, Any]]:
    """Every entry of the log, oldest first (none when it does not exist yet)."""
    data, _ = storage.read_versioned(str(log_uri))
    entries = []
    for number, line in enumerate(_lines(data), start=1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AuditLogError(
                f"{log_uri}: line {number} is not JSON; run `tumorflow audit verify`"
            ) from None
    return entries


def read_head(log_uri: str | Path) -> dict[str, Any] | None:
    """The head object beside the log, or None when there is none."""
    data, _ = storage.read_versioned(head_uri(log_uri))
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {}


def _signer_of(trust: TrustRoot | None, public_key: str, at: str) -> str | None:
    """Who the trust root says held `public_key` at `at`: a signer, a delegate (a console) or the
    pipeline (None: nobody it trusts)."""
    if trust is None:
        return None
    when = at or None
    identity = trust.identity_of(public_key, when)
    if identity is None and (delegate := trust.delegate_of(public_key, when)) is not None:
        identity = f"{delegate} (delegate)"
    if identity is None and trust.is_pipeline_key(public_key, when):
        identity = "pipeline"
    return identity


def _check_decision(decision: dict[str, Any], at: str, trust: TrustRoot | None) -> str | None:
    """Why a stored decision does not verify (None when it does)."""
    try:
        key = SignedRecord(decision["record"], decision["signature"]).public_key()
    except (SignatureInvalid, KeyError, TypeError) as exc:
        return f"its signed decision does not verify ({exc})"
    if (
        trust is not None
        and _signer_of(trust, key, decision["record"].get("signed_at", at)) is None
    ):
        return "its signed decision is signed by a key the trust root does not know"
    return None


def _position_error(lines: list[bytes], index: int, seq: Any) -> str:
    wanted = index + 1
    later = [_seq_of(line) for line in lines[index + 1 :]]
    if wanted in later:
        return f"entry {wanted} is out of order (seq {seq} stands in its place)"
    return f"entry {wanted} was removed (the next line holds seq {seq})"


def _seq_of(line: bytes) -> Any:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry.get("seq") if isinstance(entry, dict) else None


def verify(log_uri: str | Path, trust: TrustRoot | None = None) -> AuditVerdict:
    """Check the chain, every signed decision in it and the signed head.

    `first_bad` is the seq of the first entry that was changed, removed or reordered (or whose
    decision does not verify). Without a trust root, signatures are checked against the keys they
    name; with one, their keys must belong to someone it trusts, and the head must be signed.
    """
    data, _ = storage.read_versioned(str(log_uri))
    lines = _lines(data)

    def bad(seq: int, why: str) -> AuditVerdict:
        return AuditVerdict(False, len(lines), seq, why)

    decisions = []
    for index, line in enumerate(lines):
        seq = index + 1
        try:
            entry = json.loads(line)
        except ValueError:
            return bad(seq, f"entry {seq} is not valid JSON (it was changed)")
        if not isinstance(entry, dict):
            return bad(seq, f"entry {seq} is not an entry object (it was changed)")
        if entry.get("seq") != seq:
            return bad(seq, _position_error(lines, index, entry.get("seq")))
        expected = line_digest(lines[index - 1]) if index else GENESIS
        if entry.get("prev") != expected:
            if index == 0:
                return bad(1, "entry 1 does not start the chain (it was changed)")
            return bad(seq - 1, f"entry {seq - 1} was changed: entry {seq} holds another digest")
        if canonical(entry) != line:
            return bad(seq, f"entry {seq} was changed (it is not in its written form)")
        if "decision" in entry:
            why = _check_decision(entry["decision"], entry.get("at", ""), trust)
            if why:
                return bad(seq, f"entry {seq}: {why}")
            decisions.append(entry["decision"]["record"])
    verdict = _verify_head(log_uri, lines, trust)
    verdict.decisions = decisions
    return verdict


def _verify_head(log_uri: str | Path, lines: list[bytes], trust: TrustRoot | None) -> AuditVerdict:
    count = len(lines)
    head = read_head(log_uri)
    if head is None:
        if count == 0:
            return AuditVerdict(True, 0, why="the log is empty")
        return AuditVerdict(False, count, count, f"{head_uri(log_uri)} is missing")
    seq = head.get("seq")
    if not isinstance(seq, int) or "digest" not in head:
        return AuditVerdict(False, count, count or None, "the head is not a head object")
    if seq > count:
        return AuditVerdict(
            False,
            count,
            count + 1,
            f"entries {count + 1}..{seq} were removed (the head counts {seq})",
        )
    if seq < 1 or line_digest(lines[seq - 1]) != head["digest"]:
        return AuditVerdict(
            False, count, max(seq, 1), f"entry {seq} does not match the signed head (rewritten)"
        )
    if "signature" not in head:
        if trust is not None:
            return AuditVerdict(False, count, None, "the head is not signed")
        return AuditVerdict(True, count, why=f"chain intact; the head (entry {seq}) is not signed")
    try:
        key = verify_signature(
            _head_payload(seq, head["digest"]), head["signature"], HEAD_NAMESPACE
        )
    except SignatureInvalid as exc:
        return AuditVerdict(False, count, None, f"the head's signature does not verify ({exc})")
    if key != head.get("public_key"):
        return AuditVerdict(False, count, None, "the head is signed by another key than it names")
    signer = head.get("signer")
    if trust is not None:
        signer = _signer_of(trust, key, head.get("signed_at", ""))
        if signer is None:
            return AuditVerdict(
                False, count, None, "the head is signed by a key the trust root does not know"
            )
    if seq < count:
        return AuditVerdict(
            False,
            count,
            seq + 1,
            f"entries {seq + 1}..{count} are not covered by the signed head (appended without "
            "the key, or by a writer that stopped before signing)",
        )
    return AuditVerdict(
        True,
        count,
        why=f"{count} entries, chain intact, head signed by {signer}",
        head_signer=signer,
    )
