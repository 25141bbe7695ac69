"""Deploy: a blessed model becomes the next integer version that TF Serving serves as `stable`.

The SavedModel published is the one the train step exported and evaluate scored, copied byte for
byte (its digest checked). Local model base paths: it is copied into `<base>/.tmp-<name>-<uuid>/`
(beside, not inside, the folder that version listings walk) and renamed to
`<base>/<name>/<version>/`; `rename` onto an existing version fails, so two concurrent deploys take
distinct versions and a reader never sees half a version (TF Serving ignores non-integer names).
gs:// base paths have no rename: the files are uploaded into `<version>/` with `saved_model.pb`
last, and TF Serving only loads a version once `saved_model.pb` exists; run one deploy per model at
a time there (the pipeline does).

`<base>/models.config` is written through `core.serving_layout` (which owns the layout and the
rule of which versions are loaded); older version folders stay on disk, not loaded, so that
`tumorflow rollback --to N` can bring them back.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorflow.components.release.signing import SignatureInvalid, SignedRecord, Signer
from tumorflow.components.release.trust_root import (
    DecisionRefused,
    TrustRoot,
    VerifiedDecision,
    sign_decision,
)
from tumorflow.core import serving_layout, storage
from tumorflow.core.artifacts import APPROVAL_FILE, MODEL_INFO_FILE
from tumorflow.core.errors import TumorflowError
from tumorflow.core.serving_layout import CANARY, PREVIOUS, SAVED_MODEL, STABLE, served_versions

log = logging.getLogger(__name__)


class DeployRefused(TumorflowError):
    """The model may not be deployed: the gate failed or approval was not given."""


RELEASE_SCHEMA = "tumorflow.release/v1"
# The actions whose signed record releases a version.
RELEASING_ACTIONS = ("approve", "override", "auto_approve")


def verify_release(
    trust: TrustRoot,
    records: list[dict[str, Any]],
    *,
    model_name: str,
    model_version: str | None,
    serving_digest: str,
    decision_digest: str | None,
) -> list[VerifiedDecision]:
    """The signed approvals among `records` that hold for this artifact; DeployRefused (with why
    each one does not) when none does."""
    verified, refused = [], []
    for item in records:
        try:
            verified.append(
                trust.verify(
                    SignedRecord(item["record"], item["signature"]),
                    action=RELEASING_ACTIONS,
                    model_name=model_name,
                    model_version=model_version,
                    serving_digest=serving_digest,
                    decision_digest=decision_digest,
                )
            )
        except (KeyError, TypeError, SignatureInvalid, DecisionRefused) as exc:
            refused.append(str(exc))
    if not verified:
        raise DeployRefused(
            f"no signed approval of {model_name} (SavedModel {serving_digest[:12]}…) verifies "
            f"against the trust root {trust.source}"
            + (f": {'; '.join(refused)}" if refused else "")
            + "; nothing deployed"
        )
    return verified


def release_status(version_folder: str | Path, model_name: str, trust: TrustRoot) -> str | None:
    """None when the served version holds a release record that verifies and whose
    serving_digest is the SavedModel's own digest; else why not, in a few words."""
    from tumorflow.components.training.export import saved_model_digest

    folder = Path(version_folder)
    path = folder / serving_layout.ASSETS_EXTRA / serving_layout.RELEASE_RECORD
    if not path.is_file():
        return "unsigned: no release record"
    try:
        release = json.loads(path.read_text())
        digest = saved_model_digest(folder)
        verify_release(
            trust,
            release.get("records") or [],
            model_name=model_name,
            model_version=None,
            serving_digest=digest,
            decision_digest=None,
        )
    except (ValueError, OSError) as exc:
        return f"unsigned: unreadable release record ({exc})"
    except DeployRefused as exc:
        return f"unsigned: {exc}"
    return None


def _write_release_record(
    assets: Path,
    verified: list[VerifiedDecision],
    *,
    model_name: str,
    model_version: str | None,
    serving_digest: str,
    decision_digest: str,
) -> None:
    release = {
        "schema": RELEASE_SCHEMA,
        "model_name": model_name,
        "model_version": model_version,
        "serving_digest": serving_digest,
        "decision_digest": decision_digest,
        "records": [{"record": v.record, "signature": v.signed.signature} for v in verified],
    }
    assets.mkdir(parents=True, exist_ok=True)
    (assets / serving_layout.RELEASE_RECORD).write_text(json.dumps(release, indent=2))


# The audit log's word for each decision (the console's audit page lists them).
AUDIT_WHAT = {
    "approve": "approval",
    "reject": "rejection",
    "override": "override",
    "auto_approve": "automatic approval",
    "rollback": "rollback",
    "promote": "promote",
    "policy": "policy",
}


def audit_event(
    audit_log: str,
    who: str,
    what: str,
    why: str = "",
    *,
    signer: Signer | None = None,
    decision: SignedRecord | None = None,
    **details: Any,
) -> None:
    """Append an event (and the signed decision it records) to the chained audit log, if any."""
    if audit_log:
        from tumorflow.components.release import audit_log as chained_log

        event = {"who": who, "what": what, "why": why, **details}
        chained_log.append(audit_log, event, signer, decision=decision)


@dataclass(frozen=True)
class DeployResult:
    """The served version: the new one, or (`deployed` False) the stable one it would repeat."""

    version: int
    path: str
    registered_version: str | None
    deployed: bool = True
    reason: str = ""
    serving_digest: str | None = None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not Path(path).exists():
        raise DeployRefused(f"no {what} at {path}: deploy needs the gate's decision")
    return json.loads(Path(path).read_text())


def check_deployable(decision: dict[str, Any], approval: dict[str, Any] | None) -> None:
    """Raise DeployRefused unless the gate passed (or a recorded override approves it)."""
    if approval is not None and approval.get("status") != "approved":
        raise DeployRefused(
            f"approval is {approval.get('status')!r}: {approval.get('reason') or approval.get('comment') or 'not approved'}"
        )
    if not decision.get("passed") and not (approval and approval.get("override")):
        failed = [r["name"] for r in decision.get("rules", []) if not r.get("passed")]
        raise DeployRefused(
            f"the gate failed ({'; '.join(failed) or 'no passing decision'}); nothing deployed. "
            "To deploy anyway, record an override: tumorflow approve RUN --override --reason ..."
        )


def _copy_drift_reference(reference: Path, assets: Path) -> None:
    from tumorflow.components.monitoring.features import (
        PROJECTION_FILE,
        REFERENCE_FILE,
        projection_path_for,
    )

    reference = Path(reference)
    if reference.is_dir():
        reference = reference / REFERENCE_FILE
    if not reference.is_file():
        raise DeployRefused(f"the drift reference {reference} does not exist")
    shutil.copyfile(reference, assets / REFERENCE_FILE)
    projection = projection_path_for(reference)
    if projection.exists():
        shutil.copyfile(projection, assets / PROJECTION_FILE)


def candidate_export(model_dir: Path) -> tuple[Path, dict[str, str]]:
    """The model folder's serving export and its recorded digests (written by the train step)."""
    from tumorflow.components.training.export import (
        SAVED_MODEL_DIGEST,
        SERVING_EXPORT,
        WEIGHTS_DIGEST,
    )

    info_path = Path(model_dir) / MODEL_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    export_dir = Path(model_dir) / SERVING_EXPORT
    digests = {key: info.get(key) for key in (SAVED_MODEL_DIGEST, WEIGHTS_DIGEST)}
    if not (export_dir / SAVED_MODEL).exists() or not all(digests.values()):
        raise DeployRefused(
            f"{model_dir} has no recorded serving export ({SERVING_EXPORT}/ with its digests in "
            f"{MODEL_INFO_FILE}); re-run the train step, which exports it"
        )
    return export_dir, digests


def identical_served_version(
    model_base_path: str, model_name: str, weights_sha256: str
) -> int | None:
    """The `stable` version of models.config when its weights equal `weights_sha256`."""
    stable = serving_layout.serving_labels(model_base_path, model_name)[0].get(STABLE)
    if stable is None:
        return None
    folder = serving_layout.version_uri(model_base_path, model_name, stable)
    data, _ = storage.read_versioned(serving_layout.asset_uri(folder, serving_layout.MODEL_INFO))
    served_weights = json.loads(data).get("weights_sha256") if data else None
    return stable if served_weights == weights_sha256 else None


def _stage_copy(export_dir: Path, staging: Path, saved_model_sha256: str) -> None:
    """Copy the gated SavedModel byte for byte and check that the copy has the recorded digest."""
    from tumorflow.components.training.export import saved_model_digest

    shutil.copytree(export_dir, staging)
    copied = saved_model_digest(staging)
    if copied != saved_model_sha256:
        raise DeployRefused(
            f"the serving export in {export_dir} has digest {copied[:12]}… but the train step "
            f"recorded {saved_model_sha256[:12]}…: it changed after it was evaluated; re-run "
            "the pipeline"
        )


def _publish(local_version: Path, model_base_path: str, model_name: str) -> int:
    """Move/upload an exported version into place under the next free integer; return it."""
    root = serving_layout.model_root(model_base_path, model_name)
    while True:
        version = max(serving_layout.taken_versions(model_base_path, model_name), default=0) + 1
        target = storage.join(root, str(version))
        if storage.is_remote(root):
            names = storage.list_files(local_version)
            for name in sorted(names, key=lambda n: n == SAVED_MODEL):
                storage.upload_file(local_version / name, storage.join(target, name))
            return version
        try:
            os.rename(local_version, target)
            return version
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            log.info("version %d was taken by a concurrent deploy; trying the next", version)


def deploy_model(
    model_dir: Path,
    decision_path: Path,
    model_base_path: str,
    model_name: str,
    *,
    keep_versions: int,
    tracking_uri: str | None,
    pipeline_run: str,
    drift_reference: Path | None = None,
    approval_dir: Path | None = None,
    rollout: str = STABLE,
    trust: TrustRoot | None = None,
    audit_log: str = "",
) -> DeployResult:
    """Publish the model's gated serving export as the next served version, move
    `stable`/`champion`, keep `previous`.

    The SavedModel the train step exported (and evaluate scored) is copied byte for byte, its
    digest checked against the recorded one and recorded (tumorflow.json and the model-version
    tag `serving_digest`); only `assets.extra/` is written (deploy info, drift reference, the
    warm-up addressed to `model_name`). A model whose weights equal the served stable version's
    publishes nothing: `DeployResult.deployed` is False and `reason` says which version.

    With `rollout="canary"` the new version is loaded under the `canary` label (registry alias
    `canary`) while `stable` and `champion` stay; `promote_canary` makes it stable later. Refuses
    (nothing written) unless the decision passed or the approval record in
    `approval_dir/approval.json` is an approved override. With a `trust` root, the signed
    approval in approval.json must verify again for this very artifact (registry version,
    SavedModel digest, decision digest); it is published as `assets.extra/release.json`.
    """
    if rollout not in (STABLE, CANARY):
        raise DeployRefused(f"rollout must be {STABLE!r} or {CANARY!r}, not {rollout!r}")
    from tumorflow.components.release import registry
    from tumorflow.components.training.export import (
        SAVED_MODEL_DIGEST,
        WEIGHTS_DIGEST,
        write_version_assets,
    )

    decision = _read_json(Path(decision_path), "decision")
    approval = _read_json(Path(approval_dir) / APPROVAL_FILE, "approval") if approval_dir else None
    check_deployable(decision, approval)
    export_dir, digests = candidate_export(Path(model_dir))
    digest = digests[SAVED_MODEL_DIGEST]
    gated = decision.get("challenger_saved_model_sha256")
    if gated and gated != digest:
        raise DeployRefused(
            f"the gate's decision is about SavedModel {gated[:12]}…, not this model's "
            f"{digest[:12]}…; deploy the model that was gated"
        )
    same = identical_served_version(model_base_path, model_name, digests[WEIGHTS_DIGEST])
    if same is not None:
        reason = f"identical to served version {same}"
        log.info("%s: %s (same weights); nothing deployed", model_name, reason)
        path = serving_layout.version_uri(model_base_path, model_name, same)
        return DeployResult(same, path, None, False, reason, digest)

    decision_digest = hashlib.sha256(Path(decision_path).read_bytes()).hexdigest()
    client = model_version = None
    if tracking_uri:
        client = registry.connect(tracking_uri)
        model_version = registry.find_version_by_run(client, pipeline_run, model_name)
        if model_version is None:
            model_version = registry.register_model_version(
                client,
                model_name,
                model_dir,
                {
                    registry.TAG_PIPELINE_RUN: pipeline_run,
                    registry.TAG_GATE_PASSED: str(bool(decision["passed"])).lower(),
                },
            )
    verified: list[VerifiedDecision] = []
    if trust is not None:
        verified = verify_release(
            trust,
            (approval or {}).get("records") or [],
            model_name=model_name,
            model_version=model_version.version if model_version else None,
            serving_digest=digest,
            decision_digest=decision_digest,
        )
    root = storage.join(model_base_path, model_name)
    staging_parent = Path(tempfile.mkdtemp()) if storage.is_remote(root) else Path(model_base_path)
    if not storage.is_remote(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    staging = staging_parent / f".tmp-{model_name}-{uuid.uuid4().hex}"
    try:
        _stage_copy(export_dir, staging, digest)
        write_version_assets(
            staging,
            model_name,
            {
                "model_name": model_name,
                "registered_version": model_version.version if model_version else None,
                "pipeline_run": pipeline_run,
                "gate_passed": bool(decision["passed"]),
                "deployed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                registry.TAG_SERVING_DIGEST: digest,
            },
        )
        if drift_reference is not None:
            _copy_drift_reference(drift_reference, staging / serving_layout.ASSETS_EXTRA)
        if verified:
            _write_release_record(
                staging / serving_layout.ASSETS_EXTRA,
                verified,
                model_name=model_name,
                model_version=model_version.version if model_version else None,
                serving_digest=digest,
                decision_digest=decision_digest,
            )
        version = _publish(staging, model_base_path, model_name)

        def point_labels(config: Any) -> bool:
            entry = serving_layout.model_entry(config, model_name)
            old_stable = entry.version_labels.get(STABLE) if entry is not None else None
            canary = rollout == CANARY and old_stable is not None
            serving_layout.set_served_versions(
                config,
                model_base_path,
                model_name,
                # A concurrent deploy that published a higher version and pointed `stable` at it
                # first keeps it: the newest deploy wins whichever writes last.
                stable=old_stable if canary else max(version, old_stable or 0),
                canary=version if canary else None,
                keep_versions=keep_versions,
            )
            return canary

        as_canary = serving_layout.edit_serving_config(model_base_path, point_labels)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if storage.is_remote(root):
            shutil.rmtree(staging_parent, ignore_errors=True)
    path = storage.join(root, str(version))
    if client is not None and model_version is not None:
        tags = {
            registry.TAG_SERVING_VERSION: str(version),
            registry.TAG_SERVING_PATH: path
            if storage.is_remote(path)
            else str(Path(path).resolve()),
            registry.TAG_GATE_PASSED: str(bool(decision["passed"])).lower(),
            registry.TAG_PIPELINE_RUN: pipeline_run,
            registry.TAG_SERVING_DIGEST: digest,
        }
        if approval is not None:
            tags.update(approval_tags(approval))
        registry.set_version_tags(client, model_name, model_version.version, tags)
        if as_canary:
            client.set_registered_model_alias(model_name, CANARY, model_version.version)
        else:
            registry.move_champion(client, model_name, model_version.version)
    audit_event(
        audit_log,
        "pipeline",
        "deploy",
        f"released by {', '.join(v.identity for v in verified) or 'nobody (unsigned)'}",
        model_name=model_name,
        model_version=model_version.version if model_version else None,
        served_version=version,
        serving_digest=digest,
        pipeline_run=pipeline_run,
    )
    log.info(
        "deployed %s version %d to %s%s%s",
        model_name,
        version,
        path,
        " as canary" if as_canary else "",
        f" (release signed by {', '.join(v.identity for v in verified)})" if verified else "",
    )
    return DeployResult(
        version, path, model_version.version if model_version else None, serving_digest=digest
    )


def approval_tags(approval: dict[str, Any]) -> dict[str, str]:
    """Model-version tags of an approval record (docs/artifacts.md "MLflow conventions")."""
    return {
        f"approval.{key}": str(approval[key]).lower()
        if isinstance(approval[key], bool)
        else str(approval[key])
        for key in ("status", "by", "at", "comment", "override")
        if approval.get(key) not in (None, "")
    }


@dataclass(frozen=True)
class RollbackResult:
    stable: int
    replaced: int | None
    champion_version: str | None


def rollback(
    tracking_uri: str | None,
    model_name: str,
    model_base_path: str,
    to_version: int | None = None,
    *,
    keep_versions: int = 2,
    trust: TrustRoot | None = None,
    signer: Signer | None = None,
    reason: str = "",
    identity: str | None = None,
    authenticated_via: str = "ssh key",
    audit_log: str = "",
) -> RollbackResult:
    """Serve an earlier version again: `stable` label and `champion` alias go back, no retraining.

    `to_version` is a served (directory) version; by default the one labelled `previous`, or,
    while a canary is in flight, `stable` itself (the canary is abandoned). Versions above the
    new `stable` stop being loaded, so requests that name no version move too. With a `trust`
    root it moves only with a record signed by `signer` (an operator or approver of the model).
    """
    labels, _ = serving_layout.serving_labels(model_base_path, model_name)
    if to_version is None and CANARY in labels and STABLE in labels:
        to_version = labels[STABLE]
    target = to_version if to_version is not None else labels.get(PREVIOUS)
    if target is None:
        raise DeployRefused(
            f"{model_name} has no previous served version to roll back to; pass --to VERSION "
            f"(on disk: {served_versions(model_base_path, model_name) or 'none'})"
        )
    return _make_stable(
        tracking_uri,
        model_name,
        model_base_path,
        target,
        keep_versions,
        "rollback",
        _Signing(trust, signer, reason, identity, authenticated_via, audit_log),
    )


def promote_canary(
    tracking_uri: str | None,
    model_name: str,
    model_base_path: str,
    *,
    keep_versions: int = 2,
    trust: TrustRoot | None = None,
    signer: Signer | None = None,
    reason: str = "",
    identity: str | None = None,
    authenticated_via: str = "ssh key",
    audit_log: str = "",
) -> RollbackResult:
    """Make the `canary` version stable: label and `champion` alias move, the canary label goes;
    with a `trust` root only on a record signed by an operator or approver of the model."""
    labels, _ = serving_layout.serving_labels(model_base_path, model_name)
    if CANARY not in labels:
        raise DeployRefused(f"{model_name} has no canary version to promote")
    return _make_stable(
        tracking_uri,
        model_name,
        model_base_path,
        labels[CANARY],
        keep_versions,
        "promote",
        _Signing(trust, signer, reason, identity, authenticated_via, audit_log),
    )


@dataclass(frozen=True)
class _Signing:
    """Who signs a move of `stable`, for whom, and the trust root that must accept it."""

    trust: TrustRoot | None
    signer: Signer | None
    reason: str
    identity: str | None
    authenticated_via: str
    audit_log: str

    def sign(self, action: str, model_name: str, current: int | None, target: int) -> SignedRecord:
        """The signed record of this move, verified; DeployRefused (nothing moves) otherwise."""
        if self.signer is None:
            raise DeployRefused(
                f"a {action} of {model_name} needs a signed record: sign it with your key "
                "(`tumorflow rollback|promote --key PATH`) or in the console; stable stays at "
                f"version {current}"
            )
        signed = sign_decision(
            self.signer,
            action,
            signer=self.identity or self.signer.identity,
            authenticated_via=self.authenticated_via,
            reason=self.reason,
            model_name=model_name,
            from_version=current,
            to_version=target,
        )
        try:
            self.trust.verify(signed, action=action, model_name=model_name)
        except DecisionRefused as exc:
            raise DeployRefused(f"{action} refused: {exc}; stable stays at {current}") from None
        return signed


def _make_stable(
    tracking_uri: str | None,
    model_name: str,
    model_base_path: str,
    target: int,
    keep_versions: int,
    action: str,
    signing: _Signing,
) -> RollbackResult:
    """Point `stable` (and the registry's `champion`) at served version `target`; record why.

    A canary in flight ends: its label and alias go (promoted, or abandoned by a rollback).
    """
    from tumorflow.components.release import registry

    labels, _ = serving_layout.serving_labels(model_base_path, model_name)
    current = labels.get(STABLE)
    if target not in served_versions(model_base_path, model_name):
        raise DeployRefused(
            f"{model_name} version {target} is not on disk under {model_base_path}; "
            f"choose one of {served_versions(model_base_path, model_name)}"
        )
    if target == current and CANARY not in labels:
        raise DeployRefused(f"{model_name} version {target} is already the stable version")
    signed = None
    if signing.trust is not None:
        signed = signing.sign(action, model_name, current, target)
    by = signed.record["signer"] if signed else None
    champion_version = None
    if tracking_uri:
        client = registry.connect(tracking_uri)
        found = client.search_model_versions(
            f"name = '{model_name}' and tags.`{registry.TAG_SERVING_VERSION}` = '{target}'"
        )
        if not found:
            raise DeployRefused(
                f"no registered version of {model_name} is tagged serving_version={target}"
            )
        champion_version = max(found, key=lambda mv: int(mv.version)).version
        registry.move_champion(client, model_name, champion_version)
        if CANARY in labels:
            client.delete_registered_model_alias(model_name, CANARY)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        tags = {f"{action}.at": now, f"{action}.from_serving_version": str(current)}
        if by:
            tags[f"{action}.by"] = by
        registry.set_version_tags(client, model_name, champion_version, tags)
        if signed is not None:
            registry.store_decision(client, model_name, champion_version, signed)
    serving_layout.edit_serving_config(
        model_base_path,
        lambda config: serving_layout.set_served_versions(
            config, model_base_path, model_name, stable=target, keep_versions=keep_versions
        ),
    )
    audit_event(
        signing.audit_log,
        by or "unsigned",
        AUDIT_WHAT[action],
        signing.reason,
        signer=signing.signer,
        decision=signed,
        model_name=model_name,
        stable=target,
        replaced=current,
    )
    log.info(
        "%s of %s: stable version %s -> %s%s",
        action,
        model_name,
        current,
        target,
        f" (signed by {by})" if by else "",
    )
    return RollbackResult(target, current, champion_version)


def unsigned_versions(
    model_base_path: str, model_name: str, trust: TrustRoot, versions: list[int]
) -> dict[int, str]:
    """Served versions (of a local base path) `tumorflow serve` will not load, and why."""
    if storage.is_remote(model_base_path):
        return {}
    found = {}
    for version in versions:
        folder = serving_layout.version_uri(model_base_path, model_name, version)
        why = release_status(folder, model_name, trust)
        if why is not None:
            found[version] = why
    return found


def model_status(
    tracking_uri: str | None,
    model_name: str,
    model_base_path: str,
    last: int = 10,
    trust: TrustRoot | None = None,
) -> dict[str, Any]:
    """What `tumorflow status` shows: served versions and labels, aliases, recent model versions;
    with a trust root, the versions that are not loaded because they are unsigned."""
    from tumorflow.components.release import registry

    labels, loaded = serving_layout.serving_labels(model_base_path, model_name)
    on_disk = served_versions(model_base_path, model_name)
    status: dict[str, Any] = {
        "model_name": model_name,
        "model_base_path": model_base_path,
        "serving": {
            "on_disk": on_disk,
            "loaded": loaded,
            "labels": labels,
        },
        "aliases": {},
        "versions": [],
    }
    if trust is not None:
        status["serving"]["unsigned"] = unsigned_versions(
            model_base_path, model_name, trust, loaded
        )
    if tracking_uri:
        client = registry.connect(tracking_uri)
        status["aliases"] = registry.aliases(client, model_name)
        status["versions"] = [
            {
                "version": mv.version,
                "created": dt.datetime.fromtimestamp(
                    mv.creation_timestamp / 1000, dt.UTC
                ).isoformat(timespec="seconds"),
                "pipeline_run": mv.tags.get(registry.TAG_PIPELINE_RUN),
                "gate_passed": mv.tags.get(registry.TAG_GATE_PASSED),
                "serving_version": mv.tags.get(registry.TAG_SERVING_VERSION),
                "approval": {
                    k.split(".", 1)[1]: v for k, v in mv.tags.items() if k.startswith("approval.")
                },
                "rollback": {
                    k.split(".", 1)[1]: v for k, v in mv.tags.items() if k.startswith("rollback.")
                },
                "aliases": sorted(a for a, v in status["aliases"].items() if v == mv.version),
            }
            for mv in registry.list_versions(client, model_name)[:last]
        ]
    return status
