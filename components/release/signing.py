"""SSH signatures of release decisions, in the format git and `ssh-keygen -Y sign` write (SSHSIG).

A decision is a dict signed as canonical JSON. Keys are ordinary OpenSSH Ed25519 keys: people sign
with the key they already have (`~/.ssh/id_ed25519`, or their agent through `ssh-keygen`), and
`ssh-keygen -Y verify` with an allowed-signers file checks our signatures without this project.
The format is PROTOCOL.sshsig of OpenSSH; the cryptography package does the Ed25519 arithmetic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tumorflow.core.errors import TumorflowError

NAMESPACE = "tumorflow-decision"

_MAGIC = b"SSHSIG"
_VERSION = 1
_HASH = "sha512"
_KEY_TYPE = "ssh-ed25519"
_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_END = "-----END SSH SIGNATURE-----"


class SigningError(TumorflowError):
    """A signing key cannot be read or used."""


class SignatureInvalid(TumorflowError):
    """A signature is malformed, made for another namespace, or does not match the data."""


def canonical(obj: Any) -> bytes:
    """The one byte form of a record that is signed and digested: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise SignatureInvalid("the signature is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self) -> bytes:
        return self.take(int.from_bytes(self.take(4), "big"))


def _signed_blob(data: bytes, namespace: str) -> bytes:
    """What SSHSIG actually signs: the preamble, namespace and the SHA-512 of the message."""
    return (
        _MAGIC
        + _string(namespace.encode())
        + _string(b"")
        + _string(_HASH.encode())
        + _string(hashlib.sha512(data).digest())
    )


def _public_blob(key: Ed25519PublicKey) -> bytes:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _string(_KEY_TYPE.encode()) + _string(raw)


def _public_line(blob: bytes) -> str:
    return f"{_KEY_TYPE} {base64.b64encode(blob).decode()}"


def public_key_line(public_key: str) -> str:
    """A public key as "ssh-ed25519 AAAA...", without the comment an authorized_keys line may have."""
    parts = public_key.split()
    if len(parts) < 2:
        raise SignatureInvalid(f"not an OpenSSH public key: {public_key[:40]!r}")
    return f"{parts[0]} {parts[1]}"


def _armor(blob: bytes) -> str:
    b64 = base64.b64encode(blob).decode()
    lines = [b64[i : i + 70] for i in range(0, len(b64), 70)]
    return "\n".join([_BEGIN, *lines, _END]) + "\n"


def _unarmor(armored: str) -> bytes:
    text = armored.strip()
    if not (text.startswith(_BEGIN) and text.endswith(_END)):
        raise SignatureInvalid("not an SSH signature (no BEGIN/END SSH SIGNATURE lines)")
    body = "".join(text[len(_BEGIN) : -len(_END)].split())
    try:
        return base64.b64decode(body, validate=True)
    except ValueError as exc:
        raise SignatureInvalid("the SSH signature is not valid base64") from exc


class Signer:
    """Signs for one identity with one Ed25519 key, held in memory or by `ssh-keygen`."""

    def __init__(
        self,
        identity: str,
        public_key: str,
        private_key: Ed25519PrivateKey | None = None,
        key_path: Path | None = None,
    ):
        self.identity = identity
        self.public_key = public_key_line(public_key)
        self._private_key = private_key
        self._key_path = key_path

    def __repr__(self) -> str:
        return f"Signer({self.identity!r}, {self.public_key[:30]}...)"

    def sign(self, data: bytes, namespace: str = NAMESPACE) -> str:
        """An armored SSH signature of data ("-----BEGIN SSH SIGNATURE-----...")."""
        if self._private_key is None:
            return _sign_with_ssh_keygen(self._key_path, data, namespace)
        pub_blob = base64.b64decode(self.public_key.split()[1])
        raw = self._private_key.sign(_signed_blob(data, namespace))
        blob = (
            _MAGIC
            + _VERSION.to_bytes(4, "big")
            + _string(pub_blob)
            + _string(namespace.encode())
            + _string(b"")
            + _string(_HASH.encode())
            + _string(_string(_KEY_TYPE.encode()) + _string(raw))
        )
        return _armor(blob)


def _sign_with_ssh_keygen(key_path: Path | None, data: bytes, namespace: str) -> str:
    """Sign through `ssh-keygen -Y sign`: it asks for the passphrase or uses the running agent."""
    if key_path is None or shutil.which("ssh-keygen") is None:
        raise SigningError("this key needs ssh-keygen (OpenSSH 8.2 or newer) to sign; install it")
    try:
        done = subprocess.run(
            ["ssh-keygen", "-Y", "sign", "-f", str(key_path), "-n", namespace],
            input=data,
            capture_output=True,
            check=False,
        )
    except OSError as exc:
        raise SigningError(f"cannot run ssh-keygen: {exc}") from exc
    if done.returncode != 0:
        raise SigningError(
            f"ssh-keygen could not sign with {key_path}: {done.stderr.decode().strip()}"
        )
    return done.stdout.decode()


def load_signer(key_path: str | Path, identity: str) -> Signer:
    """The signer of a private key file (OpenSSH Ed25519).

    An unencrypted key signs in-process. An encrypted key, or a public key whose private half
    lives in the ssh-agent (`key_path` ending in .pub), signs through `ssh-keygen -Y sign`.
    """
    path = Path(key_path).expanduser()
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise SigningError(
            f"cannot read the signing key {path}: {exc.strerror}; "
            "pass --key or set release.signing_key"
        ) from exc
    if text.startswith(b"ssh-"):
        return Signer(identity, text.decode().strip(), key_path=path)
    try:
        key = serialization.load_ssh_private_key(text, password=None)
    except TypeError:
        # Encrypted: ssh-keygen asks for the passphrase (or the agent holds it).
        pub = path.with_name(path.name + ".pub")
        if not pub.exists():
            raise SigningError(
                f"{path} is encrypted and has no {pub.name} beside it: "
                "add one (ssh-keygen -y -f KEY > KEY.pub)"
            ) from None
        return Signer(identity, pub.read_text().strip(), key_path=path)
    except ValueError as exc:
        raise SigningError(f"{path} is not an OpenSSH private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key; make one with ssh-keygen -t ed25519")
    return Signer(identity, _public_line(_public_blob(key.public_key())), private_key=key)


def generate_key(path: str | Path, comment: str) -> Signer:
    """A new Ed25519 key in OpenSSH format at path (mode 0600) and path.pub; its identity is comment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    os.chmod(path, 0o600)
    line = _public_line(_public_blob(key.public_key()))
    path.with_name(path.name + ".pub").write_text(f"{line} {comment}\n")
    return Signer(comment, line, private_key=key)


def verify_signature(data: bytes, armored: str, namespace: str = NAMESPACE) -> str:
    """The public key ("ssh-ed25519 AAAA...") whose signature of data this is, made for namespace.

    Raises SignatureInvalid when the signature is malformed, for another namespace, or does not
    match the data. Who the key belongs to is the trust root's question, not this one's.
    """
    reader = _Reader(_unarmor(armored))
    if reader.take(6) != _MAGIC:
        raise SignatureInvalid("not an SSHSIG signature")
    version = int.from_bytes(reader.take(4), "big")
    if version != _VERSION:
        raise SignatureInvalid(f"unsupported SSHSIG version {version}")
    pub_blob = reader.string()
    signed_namespace = reader.string().decode(errors="replace")
    reader.string()  # reserved
    hash_alg = reader.string().decode(errors="replace")
    sig = _Reader(reader.string())
    if signed_namespace != namespace:
        raise SignatureInvalid(f"signed for namespace {signed_namespace!r}, not {namespace!r}")
    if hash_alg not in ("sha512", "sha256"):
        raise SignatureInvalid(f"unsupported hash algorithm {hash_alg!r}")
    key_reader = _Reader(pub_blob)
    key_type = key_reader.string().decode(errors="replace")
    if key_type != _KEY_TYPE or sig.string().decode(errors="replace") != _KEY_TYPE:
        raise SignatureInvalid(f"only ssh-ed25519 signatures are accepted, not {key_type!r}")
    public = Ed25519PublicKey.from_public_bytes(key_reader.string())
    digest = hashlib.new(hash_alg, data).digest()
    message = (
        _MAGIC
        + _string(namespace.encode())
        + _string(b"")
        + _string(hash_alg.encode())
        + _string(digest)
    )
    try:
        public.verify(sig.string(), message)
    except InvalidSignature:
        raise SignatureInvalid("the signature does not match the record") from None
    return _public_line(pub_blob)


@dataclass
class SignedRecord:
    """A decision record and the SSH signature of its canonical JSON."""

    record: dict
    signature: str

    @classmethod
    def sign(cls, record: dict, signer: Signer, namespace: str = NAMESPACE) -> SignedRecord:
        return cls(record=record, signature=signer.sign(canonical(record), namespace))

    def to_json(self) -> str:
        return json.dumps({"record": self.record, "signature": self.signature}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedRecord:
        try:
            data = json.loads(text)
            return cls(record=dict(data["record"]), signature=str(data["signature"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SignatureInvalid(f"not a signed record: {exc}") from None

    def digest(self) -> str:
        return hashlib.sha256(
            canonical({"record": self.record, "signature": self.signature})
        ).hexdigest()

    def public_key(self, namespace: str = NAMESPACE) -> str:
        """The key that signed this record; raises SignatureInvalid if it does not verify."""
        return verify_signature(canonical(self.record), self.signature, namespace)


def write_allowed_signers(path: str | Path, entries: dict[str, list[str]]) -> Path:
    """An ssh-keygen allowed-signers file (identity -> keys), for `ssh-keygen -Y verify`."""
    lines = [
        f'{identity} namespaces="{NAMESPACE}" {public_key_line(key)}'
        for identity, keys in entries.items()
        for key in keys
    ]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
