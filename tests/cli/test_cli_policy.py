"""`tumorflow policy set|show` read and edit the trust root, signed by one of the model's approvers."""

from __future__ import annotations

import json

import yaml

from tumorflow.cli.main import main
from tumorflow.components.release import audit_log
from tumorflow.components.release.trust_root import TrustRoot


def _as(signing, name: str) -> list[str]:
    return ["--run-root", str(signing.run_root), "--key", str(signing.key_path(name))]


def test_show_is_the_trust_roots_view(signing, capsys):
    assert main(["policy", "show", "kidney-ct", "--run-root", str(signing.run_root)]) == 0
    out = capsys.readouterr().out
    assert "(its '*' entry)" in out and "approvers      alice" in out
    assert "operators      alice, carol" in out


def test_an_approver_sets_a_policy_in_the_local_trust_file_signed(signing, capsys):
    args = ["policy", "set", "kidney-ct", "--approval", "manual", "--approvers", "alice, bob"]
    assert main([*args, *_as(signing, "alice"), "--json"]) == 0
    out = capsys.readouterr().out
    assert f"edited the local trust root {signing.path} (signed by alice)" in out
    shown = json.loads(out.splitlines()[-1])
    assert shown["approval"] == "manual" and shown["approvers"] == ["alice", "bob"]
    assert TrustRoot.load(signing.path).policy("kidney-ct") == (
        "manual",
        ("alice", "bob"),
        ("alice", "carol"),
    )
    (entry,) = audit_log.read(signing.run_root / "audit.jsonl")
    assert entry["decision"]["record"]["action"] == "policy"
    assert entry["decision"]["record"]["signer"] == "alice"


def test_a_non_approver_cannot_change_a_policy(signing, capsys):
    before = signing.path.read_text()
    args = ["policy", "set", "kidney-ct", "--approval", "auto", "--approvers", "bob"]
    assert main([*args, *_as(signing, "bob")]) == 2
    assert "policy not changed: bob may not policy kidney-ct" in capsys.readouterr().err
    assert signing.path.read_text() == before


def test_who_set_a_policy_is_not_a_flag(signing, capsys):
    args = ["policy", "set", "kidney-ct", "--approval", "auto", "--by", "someone-else"]
    assert main([*args, *_as(signing, "alice")]) == 2
    assert "--by is gone" in capsys.readouterr().err


def test_print_only_shows_what_to_put_into_the_secret(signing, capsys):
    before = signing.path.read_text()
    args = ["policy", "set", "lung-ct", "--approval", "manual", "--print-only"]
    assert main([*args, *_as(signing, "alice")]) == 0
    out = capsys.readouterr().out
    snippet = out.split("(a Secret or its own object):\n", 1)[1].split("model ", 1)[0]
    assert yaml.safe_load(snippet)["lung-ct"]["approval"] == "manual"
    assert signing.path.read_text() == before
