"""SSH signatures in git's format: ours verify with ssh-keygen and ssh-keygen's verify with ours."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tumorflow.components.release.signing import (
    NAMESPACE,
    SignatureInvalid,
    SignedRecord,
    SigningError,
    canonical,
    generate_key,
    load_signer,
    verify_signature,
    write_allowed_signers,
)

needs_ssh_keygen = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen"
)


def test_canonical_json_does_not_depend_on_key_order_or_spacing():
    assert canonical({"b": 1, "a": "é"}) == canonical({"a": "é", "b": 1})
    assert canonical({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_a_signature_verifies_and_names_its_key(tmp_path):
    signer = generate_key(tmp_path / "alice", "alice")
    signature = signer.sign(b"approve version 3")
    assert signature.startswith("-----BEGIN SSH SIGNATURE-----")
    assert verify_signature(b"approve version 3", signature) == signer.public_key
    assert (tmp_path / "alice").stat().st_mode & 0o777 == 0o600
    assert load_signer(tmp_path / "alice", "alice").public_key == signer.public_key


def test_changed_data_another_namespace_or_garbage_is_refused(tmp_path):
    signer = generate_key(tmp_path / "alice", "alice")
    signature = signer.sign(b"approve version 3")
    with pytest.raises(SignatureInvalid, match="does not match"):
        verify_signature(b"approve version 4", signature)
    with pytest.raises(SignatureInvalid, match="namespace"):
        verify_signature(b"x", signer.sign(b"x", namespace="git"))
    with pytest.raises(SignatureInvalid, match="not an SSH signature"):
        verify_signature(b"x", "approved")


def test_a_signed_record_survives_json_and_a_changed_field_breaks_it(tmp_path):
    signer = generate_key(tmp_path / "alice", "alice")
    signed = SignedRecord.sign({"action": "approve", "model_version": "3"}, signer)
    again = SignedRecord.from_json(signed.to_json())
    assert again == signed and again.digest() == signed.digest()
    assert again.public_key() == signer.public_key
    again.record["model_version"] = "4"
    with pytest.raises(SignatureInvalid):
        again.public_key()
    assert again.digest() != signed.digest()


def test_an_unreadable_or_non_ed25519_key_says_what_to_do(tmp_path):
    with pytest.raises(SigningError, match="--key"):
        load_signer(tmp_path / "missing", "alice")
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(SigningError, match="not an OpenSSH private key"):
        load_signer(tmp_path / "junk", "alice")


@needs_ssh_keygen
def test_ours_verifies_with_ssh_keygen(tmp_path):
    signer = generate_key(tmp_path / "alice", "alice")
    data = b'{"action":"approve"}'
    (tmp_path / "sig").write_text(signer.sign(data))
    allowed = write_allowed_signers(tmp_path / "allowed", {"alice": [signer.public_key]})
    done = subprocess.run(
        [
            "ssh-keygen",
            "-Y",
            "verify",
            "-f",
            str(allowed),
            "-I",
            "alice",
            "-n",
            NAMESPACE,
            "-s",
            str(tmp_path / "sig"),
        ],
        input=data,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert b"Good" in done.stdout


@needs_ssh_keygen
def test_ssh_keygen_signatures_verify_here(tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bob", "-f", str(key)], check=True
    )
    message = tmp_path / "record.json"
    message.write_bytes(b'{"action":"reject"}')
    subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", NAMESPACE, str(message)],
        check=True,
        capture_output=True,
    )
    signature = (tmp_path / "record.json.sig").read_text()
    public = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    assert verify_signature(message.read_bytes(), signature) == public
    assert load_signer(key, "bob").public_key == public


@needs_ssh_keygen
def test_an_encrypted_key_signs_through_ssh_keygen_and_its_passphrase(tmp_path, monkeypatch):
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-C", "carol", "-f", str(key)],
        check=True,
    )
    signer = load_signer(key, "carol")
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho secret\n")
    askpass.chmod(0o700)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("SSH_ASKPASS", str(askpass))
    monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "force")
    assert verify_signature(b"x", signer.sign(b"x")) == signer.public_key
    askpass.write_text("#!/bin/sh\necho wrong\n")
    with pytest.raises(SigningError, match="ssh-keygen could not sign"):
        signer.sign(b"x")
