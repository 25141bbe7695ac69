"""The hash-chained audit log: tampering is found and named, the head's signature is checked,
and two writers of a gs:// log lose nothing."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from tumorflow.components.release import audit_log
from tumorflow.components.release.signing import SignedRecord, Signer, generate_key
from tumorflow.core import storage


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return generate_key(tmp_path_factory.mktemp("keys") / "alice", "alice")


@pytest.fixture(scope="module")
def mallory(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return generate_key(tmp_path_factory.mktemp("keys") / "mallory", "mallory")


def _decision(signer: Signer, version: int) -> SignedRecord:
    record = {
        "schema": "tumorflow.decision/v1",
        "action": "approve",
        "meaning": "approved for clinical use",
        "signer": signer.identity,
        "signed_at": "2026-12-03T10:00:00Z",
        "model_name": "kidney-ct",
        "model_version": version,
        "serving_digest": "ab" * 32,
    }
    return SignedRecord.sign(record, signer)


def _log_of(tmp_path: Path, signer: Signer, count: int = 5) -> Path:
    log = tmp_path / "audit.jsonl"
    for n in range(1, count + 1):
        audit_log.append(
            log,
            {"who": "alice", "what": "approval", "model_name": "kidney-ct", "model_version": n},
            signer,
            decision=_decision(signer, n) if n % 2 else None,
        )
    return log


def _rewrite(log: Path, edit) -> None:
    lines = log.read_text().splitlines()
    edit(lines)
    log.write_text("\n".join(lines) + "\n")


def test_an_untouched_log_verifies_with_its_decisions_and_signed_head(
    tmp_path: Path, alice: Signer
) -> None:
    log = _log_of(tmp_path, alice)
    verdict = audit_log.verify(log)
    assert verdict.ok, verdict.why
    assert verdict.entries == 5 and verdict.first_bad is None and verdict.head_signer == "alice"
    assert [d["model_version"] for d in verdict.decisions] == [1, 3, 5]
    entries = audit_log.read(log)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[1]["prev"] == audit_log.line_digest(log.read_bytes().split(b"\n")[0])


def test_a_changed_line_is_named(tmp_path: Path, alice: Signer) -> None:
    log = _log_of(tmp_path, alice)

    def change(lines: list[str]) -> None:
        entry = json.loads(lines[2])
        entry["event"]["who"] = "mallory"
        lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))

    _rewrite(log, change)
    verdict = audit_log.verify(log)
    assert not verdict.ok and verdict.first_bad == 3
    assert "entry 3 was changed" in verdict.why


def test_a_changed_last_line_is_caught_by_the_head(tmp_path: Path, alice: Signer) -> None:
    log = _log_of(tmp_path, alice, 4)
    _rewrite(log, lambda lines: lines.__setitem__(3, lines[3].replace('"alice"', '"bob"')))
    verdict = audit_log.verify(log)
    assert not verdict.ok and verdict.first_bad == 4 and "signed head" in verdict.why


def test_a_deleted_line_is_named(tmp_path: Path, alice: Signer) -> None:
    log = _log_of(tmp_path, alice)
    _rewrite(log, lambda lines: lines.pop(1))
    verdict = audit_log.verify(log)
    assert not verdict.ok and verdict.first_bad == 2 and "removed" in verdict.why


def test_a_deleted_last_line_is_named(tmp_path: Path, alice: Signer) -> None:
    log = _log_of(tmp_path, alice)
    _rewrite(log, lambda lines: lines.pop())
    verdict = audit_log.verify(log)
    assert not verdict.ok and verdict.first_bad == 5 and "removed" in verdict.why


def test_swapped_lines_are_named(tmp_path: Path, alice: Signer) -> None:
    log = _log_of(tmp_path, alice)

    def swap(lines: list[str]) -> None:
        lines[1], lines[2] = lines[2], lines[1]

    _rewrite(log, swap)
    verdict = audit_log.verify(log)
    assert not verdict.ok and verdict.first_bad == 2 and "out of order" in verdict.why


def test_a_decision_whose_signature_no_longer_matches_is_named(
    tmp_path: Path, alice: Signer
) -> None:
    log = tmp_path / "audit.jsonl"
    forged = _decision(alice, 3)
    forged.record["model_version"] = 4  # replayed onto another version: the signature breaks
    audit_log.append(log, {"who": "alice", "what": "approval"}, alice, decision=forged)
    verdict = audit_log.verify(log)
    assert not verdict.ok and verdict.first_bad == 1
    assert "signed decision does not verify" in verdict.why


def test_a_head_whose_signature_does_not_verify_is_reported(
    tmp_path: Path, alice: Signer, mallory: Signer
) -> None:
    log = _log_of(tmp_path, alice, 2)
    head = json.loads(Path(audit_log.head_uri(log)).read_text())
    # A rewritten chain re-headed with a signature by another key under alice's name.
    head["signature"] = mallory.sign(b"anything", audit_log.HEAD_NAMESPACE)
    Path(audit_log.head_uri(log)).write_text(json.dumps(head))
    verdict = audit_log.verify(log)
    assert not verdict.ok and "head's signature does not verify" in verdict.why


def test_an_unsigned_head_is_noted_and_an_unsigned_append_is_not_covered(
    tmp_path: Path, alice: Signer
) -> None:
    log = tmp_path / "audit.jsonl"
    audit_log.append(log, {"who": "ci", "what": "deploy"})
    verdict = audit_log.verify(log)
    assert verdict.ok and "not signed" in verdict.why
    # Someone appends a line with the file's own format but cannot re-sign the head.
    _log = _log_of(tmp_path / "signed", alice, 2)
    line = json.dumps(
        {
            "seq": 3,
            "prev": audit_log.line_digest(_log.read_bytes().splitlines()[-1]),
            "at": "2026-12-03T10:00:00Z",
            "event": {"who": "alice", "what": "approval"},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    with _log.open("a") as handle:
        handle.write(line + "\n")
    verdict = audit_log.verify(_log)
    assert not verdict.ok and verdict.first_bad == 3 and "not covered" in verdict.why


def test_two_gcs_writers_race_one_retries_and_no_entry_is_lost(
    gcs_emulator_preconditions: str, alice: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = f"gs://tumorflow-test/{uuid.uuid4().hex}/audit.jsonl"
    audit_log.append(log, {"who": "alice", "what": "policy"}, alice)
    both_read = threading.Barrier(2)
    first_reads: set[int] = set()
    conflicts: list[str] = []
    read_versioned, write_versioned = storage.read_versioned, storage.write_versioned

    def read_together(uri, *args, **kwargs):
        result = read_versioned(uri, *args, **kwargs)
        writer = threading.current_thread() is not threading.main_thread()
        if uri == log and writer and threading.get_ident() not in first_reads:
            first_reads.add(threading.get_ident())
            both_read.wait(timeout=30)  # both writers hold the same generation
        return result

    def write_counting(uri, *args, **kwargs):
        try:
            return write_versioned(uri, *args, **kwargs)
        except storage.ConcurrentWriteError:
            conflicts.append(uri)
            raise

    monkeypatch.setattr(storage, "read_versioned", read_together)
    monkeypatch.setattr(storage, "write_versioned", write_counting)
    errors: list[BaseException] = []

    def approve(who: str) -> None:
        try:
            audit_log.append(log, {"who": who, "what": "approval"}, alice)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=approve, args=(who,)) for who in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert log in conflicts  # one of the two lost the race and appended again
    entries = audit_log.read(log)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert {e["event"]["who"] for e in entries[1:]} == {"alice", "bob"}
    verdict = audit_log.verify(log)
    assert verdict.ok and verdict.head_signer == "alice", verdict.why


def test_against_the_trust_root_a_head_signed_by_an_unknown_key_is_refused(
    tmp_path: Path, alice: Signer, mallory: Signer
) -> None:
    from tumorflow.components.release.trust_root import TrustRoot

    trust = TrustRoot.from_dict({"signers": {"alice": [alice.public_key]}})
    log = _log_of(tmp_path / "good", alice, 2)
    verdict = audit_log.verify(log, trust)
    assert verdict.ok and verdict.head_signer == "alice", verdict.why
    # mallory appends with her own key: the chain holds, her head is valid, but nobody trusts it.
    audit_log.append(log, {"who": "mallory", "what": "approval"}, mallory)
    assert audit_log.verify(log).ok
    verdict = audit_log.verify(log, trust)
    assert not verdict.ok and "trust root does not know" in verdict.why
    unsigned = tmp_path / "unsigned" / "audit.jsonl"
    audit_log.append(unsigned, {"who": "ci", "what": "deploy"})
    verdict = audit_log.verify(unsigned, trust)
    assert not verdict.ok and "not signed" in verdict.why
