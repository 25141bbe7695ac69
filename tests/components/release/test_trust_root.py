"""The trust root decides whose signed decision counts, for which model and which artifact."""

from __future__ import annotations

import pytest
import yaml

from tumorflow.components.release.signing import generate_key
from tumorflow.components.release.trust_root import (
    DecisionRefused,
    TrustRoot,
    sign_decision,
)
from tumorflow.core.errors import ConfigError

MODEL = "kidney-ct"
DIGEST = "a" * 64
GATE = "b" * 64


@pytest.fixture()
def keys(tmp_path):
    return {name: generate_key(tmp_path / name, name) for name in ("alice", "bob", "carol")} | {
        "console": generate_key(tmp_path / "console", "console"),
        "pipeline": generate_key(tmp_path / "pipeline", "pipeline"),
    }


def _trust(keys, approval="manual", alice_grant=None) -> TrustRoot:
    return TrustRoot.from_dict(
        {
            "signers": {
                "alice": [alice_grant or {"key": keys["alice"].public_key}],
                "bob": [{"key": keys["bob"].public_key}],
                "carol": keys["carol"].public_key,
            },
            "delegates": {"console": [{"key": keys["console"].public_key}]},
            "pipeline": [{"key": keys["pipeline"].public_key}],
            "models": {
                MODEL: {"approval": approval, "approvers": ["alice"], "operators": ["carol"]},
                "*": {"approval": "manual", "approvers": ["bob"]},
            },
        },
        source="test",
    )


def _approve(key, version="4", digest=DIGEST, action="approve", **fields):
    return sign_decision(
        key,
        action,
        model_name=MODEL,
        model_version=version,
        serving_digest=digest,
        decision_digest=GATE,
        reason="looks good",
        **fields,
    )


def _verify(trust, signed, version="4", digest=DIGEST, action="approve", **kw):
    return trust.verify(
        signed,
        action=action,
        model_name=MODEL,
        model_version=version,
        serving_digest=digest,
        decision_digest=GATE,
        **kw,
    )


def test_an_approvers_signed_approval_of_this_artifact_holds(keys):
    verified = _verify(_trust(keys), _approve(keys["alice"]))
    assert verified.identity == "alice" and verified.via == "ssh key"
    assert verified.record["meaning"] == "approved for clinical use"


def test_a_non_approver_is_refused_even_with_a_valid_signature(keys):
    with pytest.raises(DecisionRefused, match=r"bob may not approve kidney-ct.*allows alice"):
        _verify(_trust(keys), _approve(keys["bob"]))


def test_a_replayed_approval_of_another_version_is_refused(keys):
    of_version_3 = _approve(keys["alice"], version="3", digest="c" * 64)
    with pytest.raises(DecisionRefused, match="model_version mismatch"):
        _verify(_trust(keys), of_version_3)
    with pytest.raises(DecisionRefused, match="serving_digest mismatch"):
        _verify(_trust(keys), of_version_3, version="3")


def test_an_edited_record_or_a_key_outside_the_trust_root_is_refused(keys, tmp_path):
    signed = _approve(keys["alice"])
    signed.record["signer"] = "bob"
    with pytest.raises(DecisionRefused, match="bad signature"):
        _verify(_trust(keys), signed)
    mallory = generate_key(tmp_path / "mallory", "alice")
    with pytest.raises(DecisionRefused, match=r"does not hold.*claims alice"):
        _verify(_trust(keys), _approve(mallory))
    bob_as_alice = _approve(keys["bob"], signer="alice")
    with pytest.raises(DecisionRefused, match="signed with bob's key but the record names alice"):
        _verify(_trust(keys), bob_as_alice)


def test_the_console_signs_for_the_identity_it_authenticated(keys):
    via = "console: proxy header X-Forwarded-User at 2026-12-03T10:00:00Z"
    for_alice = _approve(keys["console"], signer="alice", authenticated_via=via)
    verified = _verify(_trust(keys), for_alice)
    assert (verified.identity, verified.via) == ("alice", "delegate console")
    for_bob = _approve(keys["console"], signer="bob", authenticated_via=via)
    with pytest.raises(DecisionRefused, match="bob may not approve"):
        _verify(_trust(keys), for_bob)
    for_nobody = _approve(keys["console"], signer="eve", authenticated_via=via)
    with pytest.raises(DecisionRefused, match="eve, who is not a signer"):
        _verify(_trust(keys), for_nobody)


def test_the_pipeline_key_approves_only_automatically_under_policy_auto(keys):
    auto = _approve(keys["pipeline"], action="auto_approve")
    assert _verify(_trust(keys, "auto"), auto, action="auto_approve").identity == "pipeline"
    with pytest.raises(DecisionRefused, match="approval is manual"):
        _verify(_trust(keys, "manual"), auto, action="auto_approve")
    with pytest.raises(DecisionRefused, match="automatic approvals only"):
        _verify(_trust(keys, "auto"), _approve(keys["pipeline"]))


def test_operators_roll_back_and_approvers_too_but_nobody_else(keys):
    def rollback(signer):
        return sign_decision(
            signer, "rollback", model_name=MODEL, reason="drift", from_version=4, to_version=3
        )

    trust = _trust(keys)
    assert trust.verify(rollback(keys["carol"]), action="rollback", model_name=MODEL)
    assert trust.verify(rollback(keys["alice"]), action="rollback", model_name=MODEL)
    with pytest.raises(DecisionRefused, match="bob may not rollback"):
        trust.verify(rollback(keys["bob"]), action="rollback", model_name=MODEL)
    with pytest.raises(DecisionRefused, match="'rollback' record, not approve"):
        _verify(trust, rollback(keys["alice"]))


def test_key_rotation_stops_new_decisions_and_old_records_still_verify(keys, tmp_path):
    signed_in_2026 = _approve(keys["alice"], signed_at="2026-06-01T00:00:00Z")
    dated_2026 = _trust(keys)
    dated_2026.save(tmp_path / "trust-2026-06.yaml")
    # Rotation: alice's old key expires, her new one takes over.
    new_key = generate_key(tmp_path / "alice-2027", "alice")
    rotated = _trust(
        keys,
        alice_grant={"key": keys["alice"].public_key, "valid_before": "2026-12-01T00:00:00Z"},
    )
    rotated.signers["alice"] += TrustRoot.from_dict(
        {"signers": {"alice": [{"key": new_key.public_key}]}}
    ).signers["alice"]
    with pytest.raises(DecisionRefused, match="does not hold"):
        _verify(rotated, _approve(keys["alice"]))
    assert _verify(rotated, _approve(new_key)).identity == "alice"
    # The old record still holds at the time it was signed, and with the dated trust file.
    assert _verify(rotated, signed_in_2026, at="2026-06-01T00:00:00Z").identity == "alice"
    old_file = TrustRoot.load(tmp_path / "trust-2026-06.yaml")
    assert _verify(old_file, signed_in_2026).identity == "alice"
    # Removed outright: nothing new verifies with it.
    removed = _trust(keys, alice_grant={"key": new_key.public_key})
    with pytest.raises(DecisionRefused, match="does not hold"):
        _verify(removed, signed_in_2026)


def test_policy_falls_back_to_the_star_entry_and_loads_from_yaml(keys, tmp_path):
    trust = _trust(keys)
    assert trust.policy(MODEL) == ("manual", ("alice",), ("carol",))
    assert trust.policy("brain-mri") == ("manual", ("bob",), ())
    assert TrustRoot.from_dict({}).policy(MODEL) == ("manual", (), ())
    path = tmp_path / "trust.yaml"
    path.write_text(trust.dump())
    assert TrustRoot.load(path).to_dict() == trust.to_dict()


def test_a_bad_or_missing_trust_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"release\.trust_root"):
        TrustRoot.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"models": {MODEL: {"approval": "maybe"}}}))
    with pytest.raises(ConfigError, match="approval must be auto or manual"):
        TrustRoot.load(tmp_path / "bad.yaml")
    (tmp_path / "nokey.yaml").write_text(yaml.safe_dump({"signers": {"alice": [{}]}}))
    with pytest.raises(ConfigError, match="has no key"):
        TrustRoot.load(tmp_path / "nokey.yaml")


def test_signer_for_names_the_key_by_the_trust_root_and_refuses_another_name(keys, tmp_path):
    trust = _trust(keys)
    assert trust.signer_for(tmp_path / "alice").identity == "alice"
    with pytest.raises(DecisionRefused, match="belongs to alice in the trust root, not bob"):
        trust.signer_for(tmp_path / "alice", "bob")
    generate_key(tmp_path / "stranger", "x")
    with pytest.raises(DecisionRefused, match="not a signer in the trust root"):
        trust.signer_for(tmp_path / "stranger")


def test_a_local_run_gets_a_throwaway_trust_root_once(tmp_path):
    from tumorflow.components.release.trust_root import ensure_local_trust_root

    trust_file, keys_dir = tmp_path / "trust_root.yaml", tmp_path / "keys"
    made = ensure_local_trust_root(
        str(trust_file), str(keys_dir / "pipeline"), str(keys_dir / "console"), "dana"
    )
    assert made and made.count("\n") == 0 and "throwaway trust root" in made
    trust = TrustRoot.load(trust_file)
    assert trust.policy("any-model") == ("auto", ("dana",), ("dana",))
    assert trust.signer_for(keys_dir / "dana").identity == "dana"
    assert (keys_dir / "pipeline").stat().st_mode & 0o777 == 0o600
    before = trust_file.read_text()
    assert (
        ensure_local_trust_root(
            str(trust_file), str(keys_dir / "pipeline"), str(keys_dir / "console"), "dana"
        )
        is None
    )
    assert trust_file.read_text() == before
