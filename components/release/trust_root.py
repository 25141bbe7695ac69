"""The trust root: who may sign which decision for which model, kept outside the registry.

A YAML file (a Kubernetes Secret mounted as a file, a local path, or its own gs:// object):

    signers:   {alice: [{key: "ssh-ed25519 AAAA...", valid_after: 2026-01-01T00:00:00Z}]}
    delegates: {console: [{key: "ssh-ed25519 AAAA..."}]}  # sign for the identity they authenticated
    pipeline:  [{key: "ssh-ed25519 AAAA..."}]              # automatic approvals only
    models:    {kidney-ct: {approval: manual, approvers: [alice], operators: [alice, carol]},
                "*": {approval: manual, approvers: [alice]}}

The MLflow registry only stores signed records; it is never asked who decided. A key removed from
the file, or past its `valid_before`, verifies no new decision, while a record signed when it was
valid still verifies against the dated copy of the file that was in force then.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tumorflow.components.release.approval_rules import APPROVAL_MODES, AUTO, MANUAL
from tumorflow.components.release.signing import (
    SignatureInvalid,
    SignedRecord,
    Signer,
    generate_key,
    load_signer,
    public_key_line,
)
from tumorflow.core import storage
from tumorflow.core.errors import ConfigError, TumorflowError

SCHEMA = "tumorflow.decision/v1"
PIPELINE = "pipeline"

# What each action means, as the record states it: the meaning of the signature.
MEANINGS = {
    "approve": "approved for clinical use",
    "reject": "rejected",
    "override": "override of a failed gate",
    "rollback": "rollback of the served model",
    "promote": "promotion of the canary to stable",
    "policy": "change of the approval policy",
    "auto_approve": "approved automatically: the gate passed under policy auto",
}
ACTIONS = tuple(MEANINGS)
# Who may sign each action: the model's approvers, or its operators as well.
_APPROVER_ACTIONS = ("approve", "reject", "override", "policy")
_OPERATOR_ACTIONS = ("rollback", "promote")


class DecisionRefused(TumorflowError):
    """A signed decision does not hold: the one-line reason says why."""


def utc_now() -> str:
    """UTC, to the second, with a Z: the form of `signed_at`."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any, what: str) -> dt.datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"trust root: {what} is not an ISO time: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _as_time(at: str | dt.datetime | None) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.UTC)
    return _parse_time(at, "time") or dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class KeyGrant:
    """One key of an identity and the time it is valid in (either bound open)."""

    key: str
    valid_after: dt.datetime | None = None
    valid_before: dt.datetime | None = None

    def valid_at(self, at: dt.datetime) -> bool:
        if self.valid_after is not None and at < self.valid_after:
            return False
        return self.valid_before is None or at < self.valid_before

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        for name in ("valid_after", "valid_before"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out


@dataclass(frozen=True)
class ModelPolicy:
    """A model's approval mode and who approves and operates it."""

    approval: str = MANUAL
    approvers: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifiedDecision:
    """A signed decision that holds: whose it is, how it was signed, and the record."""

    signed: SignedRecord
    identity: str
    # "ssh key", "delegate console" or "pipeline key"
    via: str
    public_key: str

    @property
    def record(self) -> dict[str, Any]:
        return self.signed.record


def _grants(value: Any, where: str) -> list[KeyGrant]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    grants = []
    for item in value:
        entry = {"key": item} if isinstance(item, str) else dict(item)
        if not entry.get("key"):
            raise ConfigError(f"trust root: an entry of {where} has no key")
        try:
            key = public_key_line(str(entry["key"]))
        except SignatureInvalid as exc:
            raise ConfigError(f"trust root: {where}: {exc}") from None
        grants.append(
            KeyGrant(
                key=key,
                valid_after=_parse_time(entry.get("valid_after"), f"{where} valid_after"),
                valid_before=_parse_time(entry.get("valid_before"), f"{where} valid_before"),
            )
        )
    return grants


def _names(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else (value or ())
    return tuple(dict.fromkeys(str(name).strip() for name in items if str(name).strip()))


@dataclass
class TrustRoot:
    """The allowed signers, delegates, pipeline keys and model policies of one trust file."""

    signers: dict[str, list[KeyGrant]] = field(default_factory=dict)
    delegates: dict[str, list[KeyGrant]] = field(default_factory=dict)
    pipeline: list[KeyGrant] = field(default_factory=list)
    models: dict[str, ModelPolicy] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "") -> TrustRoot:
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"trust root {source}: expected a mapping at the top")
        models = {}
        for name, entry in (data.get("models") or {}).items():
            entry = entry or {}
            approval = entry.get("approval", MANUAL)
            if approval not in APPROVAL_MODES:
                raise ConfigError(
                    f"trust root {source}: models.{name}.approval must be "
                    f"{' or '.join(APPROVAL_MODES)}, not {approval!r}"
                )
            models[str(name)] = ModelPolicy(
                approval, _names(entry.get("approvers")), _names(entry.get("operators"))
            )
        return cls(
            signers={
                str(k): _grants(v, f"signers.{k}") for k, v in (data.get("signers") or {}).items()
            },
            delegates={
                str(k): _grants(v, f"delegates.{k}")
                for k, v in (data.get("delegates") or {}).items()
            },
            pipeline=_grants(data.get("pipeline"), "pipeline"),
            models=models,
            source=source,
        )

    @classmethod
    def load(cls, uri: str | Path) -> TrustRoot:
        """The trust root at a path or gs:// URI; a missing or unreadable file is a ConfigError."""
        if not str(uri):
            raise ConfigError(
                "no trust root configured: set release.trust_root to the trust file "
                "(docs/signing.md says how to make one)"
            )
        data, _ = storage.read_versioned(str(uri))
        if data is None:
            raise ConfigError(
                f"no trust root at {uri}: set release.trust_root to the trust file "
                "(docs/signing.md says how to make one)"
            )
        try:
            parsed = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ConfigError(f"trust root {uri} is not valid YAML: {exc}") from None
        return cls.from_dict(parsed, source=str(uri))

    def to_dict(self) -> dict[str, Any]:
        def grants(items: list[KeyGrant]) -> list[dict[str, Any]]:
            return [g.to_dict() for g in items]

        return {
            "signers": {k: grants(v) for k, v in self.signers.items()},
            "delegates": {k: grants(v) for k, v in self.delegates.items()},
            "pipeline": grants(self.pipeline),
            "models": {
                name: {
                    "approval": p.approval,
                    "approvers": list(p.approvers),
                    "operators": list(p.operators),
                }
                for name, p in self.models.items()
            },
        }

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, uri: str | Path) -> None:
        storage.write_versioned(str(uri), self.dump().encode(), storage.read_versioned(uri)[1])

    @staticmethod
    def _match(table: dict[str, list[KeyGrant]], public_key: str, at: dt.datetime) -> str | None:
        key = public_key_line(public_key)
        for name, grants in table.items():
            if any(g.key == key and g.valid_at(at) for g in grants):
                return name
        return None

    def identity_of(self, public_key: str, at: str | dt.datetime | None = None) -> str | None:
        """The signer whose key this is at time `at` (now by default), or None."""
        return self._match(self.signers, public_key, _as_time(at))

    def delegate_of(self, public_key: str, at: str | dt.datetime | None = None) -> str | None:
        """The delegate (a console) whose key this is at `at`, or None."""
        return self._match(self.delegates, public_key, _as_time(at))

    def is_pipeline_key(self, public_key: str, at: str | dt.datetime | None = None) -> bool:
        return self._match({PIPELINE: self.pipeline}, public_key, _as_time(at)) is not None

    def model_policy(self, model_name: str) -> ModelPolicy:
        return self.models.get(model_name) or self.models.get("*") or ModelPolicy()

    def policy(self, model_name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """(approval mode, approvers, operators) of a model; `*` applies to unlisted models."""
        p = self.model_policy(model_name)
        return p.approval, p.approvers, p.operators

    def may(self, identity: str, action: str, model_name: str) -> bool:
        """Whether the trust root lets identity sign action for model_name."""
        _, approvers, operators = self.policy(model_name)
        if action in _OPERATOR_ACTIONS:
            return identity in approvers or identity in operators
        return identity in approvers

    def who_may(self, action: str, model_name: str) -> tuple[str, ...]:
        _, approvers, operators = self.policy(model_name)
        if action in _OPERATOR_ACTIONS:
            return tuple(dict.fromkeys(approvers + operators))
        return approvers

    def signer_for(self, key_path: str | Path, identity: str | None = None) -> Signer:
        """The signer of a key file under the name the trust root gives its key.

        `identity`, when given, must be that name: nobody signs as someone else.
        """
        signer = load_signer(key_path, identity or "")
        name = self.identity_of(signer.public_key)
        if name is None:
            raise DecisionRefused(
                f"the key {key_path} is not a signer in the trust root {self.source}: "
                f"add its public key ({signer.public_key[:32]}...) under signers"
            )
        if identity and identity != name:
            raise DecisionRefused(
                f"the key {key_path} belongs to {name} in the trust root, not {identity}"
            )
        signer.identity = name
        return signer

    def verify(
        self,
        signed: SignedRecord,
        *,
        action: str | tuple[str, ...],
        model_name: str,
        model_version: str | int | None = None,
        serving_digest: str | None = None,
        decision_digest: str | None = None,
        at: str | dt.datetime | None = None,
    ) -> VerifiedDecision:
        """The decision, if its signature holds, its key is trusted at `at` (now by default), its
        signer may take this action on this model and it is about this very artifact.

        Raises DecisionRefused with one line saying why not.
        """
        actions = (action,) if isinstance(action, str) else tuple(action)
        record = signed.record if isinstance(signed.record, dict) else {}
        try:
            key = signed.public_key()
        except SignatureInvalid as exc:
            raise DecisionRefused(f"bad signature: {exc}") from None
        if record.get("schema") != SCHEMA:
            raise DecisionRefused(f"not a {SCHEMA} record (schema {record.get('schema')!r})")
        if record.get("action") not in actions:
            raise DecisionRefused(f"a {record.get('action')!r} record, not {' or '.join(actions)}")
        when = _as_time(at)
        claimed = str(record.get("signer") or "")
        if (name := self.identity_of(key, when)) is not None:
            identity, via = name, "ssh key"
            if claimed != name:
                raise DecisionRefused(
                    f"signed with {name}'s key but the record names {claimed or 'nobody'}"
                )
        elif (delegate := self.delegate_of(key, when)) is not None:
            identity, via = claimed, f"delegate {delegate}"
            if not claimed or claimed not in self.signers:
                raise DecisionRefused(
                    f"the delegate {delegate} signed for {claimed or 'nobody'}, "
                    "who is not a signer in the trust root"
                )
            if not record.get("authenticated_via"):
                raise DecisionRefused(
                    f"the delegate {delegate} did not state how it authenticated {claimed}"
                )
        elif self.is_pipeline_key(key, when):
            identity, via = PIPELINE, "pipeline key"
            if record.get("action") != "auto_approve":
                raise DecisionRefused(
                    f"the pipeline key may sign automatic approvals only, not {record['action']}"
                )
            if self.policy(model_name)[0] != AUTO:
                raise DecisionRefused(
                    f"{model_name}'s approval is manual in the trust root: no automatic approval"
                )
        else:
            raise DecisionRefused(
                f"signed by a key the trust root does not hold at {when:%Y-%m-%dT%H:%M:%SZ} "
                f"({key[:32]}..., claims {claimed or 'nobody'})"
            )
        if record.get("model_name") != model_name:
            raise DecisionRefused(
                f"the record is about model {record.get('model_name')!r}, not {model_name!r}"
            )
        if identity != PIPELINE and not self.may(identity, record["action"], model_name):
            allowed = ", ".join(self.who_may(record["action"], model_name)) or "nobody"
            raise DecisionRefused(
                f"{identity} may not {record['action']} {model_name}: the trust root allows "
                f"{allowed}"
            )
        expected = {
            "model_version": None if model_version is None else str(model_version),
            "serving_digest": serving_digest,
            "decision_digest": decision_digest,
        }
        for name, want in expected.items():
            got = record.get(name)
            if want is not None and (None if got is None else str(got)) != want:
                raise DecisionRefused(
                    f"{name} mismatch: the record signs {str(got)[:16]}, "
                    f"the candidate is {str(want)[:16]} (a decision about another artifact)"
                )
        return VerifiedDecision(signed=signed, identity=identity, via=via, public_key=key)


def decision_record(
    action: str,
    *,
    signer: str,
    model_name: str,
    reason: str = "",
    authenticated_via: str = "ssh key",
    model_version: str | int | None = None,
    serving_digest: str | None = None,
    decision_digest: str | None = None,
    dataset_version: str | None = None,
    pipeline_run: str | None = None,
    from_version: int | None = None,
    to_version: int | None = None,
    signed_at: str | None = None,
) -> dict[str, Any]:
    """A `tumorflow.decision/v1` record: who decided what about which artifact, when and why."""
    if action not in MEANINGS:
        raise TumorflowError(f"unknown decision {action!r}: one of {', '.join(ACTIONS)}")
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "action": action,
        "meaning": MEANINGS[action],
        "signer": signer,
        "authenticated_via": authenticated_via,
        "signed_at": signed_at or utc_now(),
        "reason": reason,
        "model_name": model_name,
        "model_version": None if model_version is None else str(model_version),
        "serving_digest": serving_digest,
        "decision_digest": decision_digest,
        "dataset_version": dataset_version,
        "pipeline_run": pipeline_run,
    }
    if from_version is not None or to_version is not None:
        record["from_version"] = from_version
        record["to_version"] = to_version
    return record


def sign_decision(signer: Signer, action: str, /, **fields: Any) -> SignedRecord:
    """The record of a decision signed by signer; `signer=` names someone else (a delegate signs
    for the identity it authenticated), otherwise the record names the signer itself."""
    fields.setdefault("signer", signer.identity)
    return SignedRecord.sign(decision_record(action, **fields), signer)


def ensure_local_trust_root(
    trust_uri: str, pipeline_key: str, console_key: str, user: str
) -> str | None:
    """Make a throwaway trust root and keys for a local run that has none; say so in one line.

    The keys land beside the trust file (`keys/`): the pipeline's, the console's and one for
    `user`, who becomes the approver and operator of every model (policy auto, so the run's
    `gate.approval` decides). None when the trust root exists or is not a local file.
    """
    if storage.is_remote(trust_uri) or Path(trust_uri).exists():
        return None
    keys_dir = Path(trust_uri).parent / "keys"
    user_key = keys_dir / user

    def key(path: Path, name: str) -> str:
        if path.exists():
            return load_signer(path, name).public_key
        return generate_key(path, name).public_key

    trust = TrustRoot.from_dict(
        {
            "signers": {user: [{"key": key(user_key, user)}]},
            "delegates": {"console": [{"key": key(Path(console_key), "console")}]},
            "pipeline": [{"key": key(Path(pipeline_key), PIPELINE)}],
            "models": {"*": {"approval": AUTO, "approvers": [user], "operators": [user]}},
        }
    )
    trust.save(trust_uri)
    return (
        f"signing: made a throwaway trust root {trust_uri} with keys in {keys_dir} "
        f"({user} approves; sign with --key {user_key}); see docs/signing.md for real keys"
    )
