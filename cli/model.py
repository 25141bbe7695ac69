"""`tumorflow approve|reject|status|rollback|promote`: signed decisions and the served model's state.

Every decision is signed with the user's SSH key (`--key`, else `release.signing_key`, else the
key a local run made under its run root) and counts under the name the trust root gives that key;
`--as NAME` only checks that name (docs/signing.md).
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path

from tumorflow.cli.pipeline import add_config_arguments, config_from_args
from tumorflow.core.config import PipelineConfig
from tumorflow.core.errors import ConfigError

_SQLITE = "sqlite:///"


def _store(args: argparse.Namespace) -> tuple[str, str, str, int]:
    """(tracking URI, model name, model base path, versions kept) from flags and configuration."""
    config = config_from_args(args)
    return (
        args.tracking_uri or config.resolved_tracking_uri(),
        getattr(args, "model_name", None) or config.deploy.model_name,
        getattr(args, "model_base_path", None) or config.resolved_model_base_path(),
        config.deploy.keep_versions,
    )


def _store_exists(tracking_uri: str) -> bool:
    """False for a local SQLite store that no run has created (opening it would create it)."""
    return not tracking_uri.startswith(_SQLITE) or Path(tracking_uri.removeprefix(_SQLITE)).exists()


def _existing_store(tracking_uri: str) -> str:
    """The tracking URI of a command that needs runs to act on; one line when there are none."""
    if not _store_exists(tracking_uri):
        raise ConfigError(
            f"no runs yet: {tracking_uri.removeprefix(_SQLITE)} does not exist; pass the "
            "--run-root (or --tracking-uri) of the run"
        )
    return tracking_uri


def _trust(config: PipelineConfig):
    from tumorflow.components.release.trust_root import TrustRoot

    return TrustRoot.load(config.resolved_trust_root())


def _signing(args: argparse.Namespace):
    """(trust root, the user's signer, audit log) for a command that signs a decision."""
    if getattr(args, "by", None):
        raise ConfigError(
            "--by is gone: a decision is made by the trust root's name of the key that signs it; "
            "pass --key PATH (and --as NAME to check the name)"
        )
    config = config_from_args(args)
    trust = _trust(config)
    if args.key:
        key = Path(args.key).expanduser()
    else:
        # release.signing_key, else the key a local run made for this user: the first of them
        # the trust root knows.
        configured = Path(config.release.signing_key).expanduser()
        local = Path(config.resolved_trust_root()).parent / "keys" / getpass.getuser()
        known = [k for k in (configured, local) if k.exists() and _trusted(trust, k)]
        key = known[0] if known else configured
    return trust, trust.signer_for(key, args.as_name), config.resolved_audit_log()


def _trusted(trust, key: Path) -> bool:
    from tumorflow.components.release.signing import SigningError, load_signer

    try:
        return trust.identity_of(load_signer(key, "").public_key) is not None
    except SigningError:
        return False


def _decide(args: argparse.Namespace, status: str) -> int:
    from tumorflow.components.release.approval import ApprovalError, record_decision
    from tumorflow.components.release.trust_root import DecisionRefused

    tracking_uri = _existing_store(_store(args)[0])
    text = "; ".join(t for t in (args.reason, getattr(args, "comment", None)) if t)
    try:
        trust, signer, audit_log = _signing(args)
    except DecisionRefused as exc:
        raise ApprovalError(str(exc)) from None
    decision = record_decision(
        tracking_uri,
        args.run,
        status,
        comment=text or None,
        signer=signer,
        trust=trust,
        override=getattr(args, "override", False),
        model_name=args.model_name,
        audit_log=audit_log,
    )
    override = " (override of a failed gate)" if decision.override else ""
    print(
        f"{decision.model_name} version {decision.model_version} of run {args.run}: "
        f"{decision.status}{override} by {decision.by} at {decision.at} (signed)"
    )
    return 0


def _approve(args: argparse.Namespace) -> int:
    if args.reason and not args.override:
        raise ConfigError("--reason goes with --override; use --comment for a note")
    return _decide(args, "approved")


def _reject(args: argparse.Namespace) -> int:
    return _decide(args, "rejected")


def _status(args: argparse.Namespace) -> int:
    from tumorflow.components.release.deploy import model_status

    tracking_uri, model_name, base, _ = _store(args)
    has_runs = _store_exists(tracking_uri)
    config = config_from_args(args)
    trust = _trust(config) if Path(config.resolved_trust_root()).exists() else None
    status = model_status(
        tracking_uri if has_runs else None, model_name, base, last=args.last, trust=trust
    )
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    serving = status["serving"]
    labels = ", ".join(f"{k}={v}" for k, v in sorted(serving["labels"].items())) or "none"
    print(f"model          {model_name}")
    print(f"served from    {base}")
    print(f"on disk        {serving['on_disk'] or 'no versions'}")
    print(f"loaded         {serving['loaded'] or 'none'}   labels: {labels}")
    for version, why in sorted(serving.get("unsigned", {}).items()):
        print(f"               version {version}: not loaded: unsigned ({why})")
    aliases = ", ".join(f"{k}={v}" for k, v in sorted(status["aliases"].items())) or "none"
    if not has_runs:
        print(f"registry       {tracking_uri}   no runs yet")
        return 0
    print(f"registry       {tracking_uri}   aliases: {aliases}")
    if not status["versions"]:
        print("no registered versions yet")
        return 0
    print(
        f"{'version':>7}  {'served':>6}  {'gate':<6} {'approval':<10} {'by':<12} {'at':<26} run / why"
    )
    for v in status["versions"]:
        approval = v["approval"]
        gate = {"true": "pass", "false": "FAIL"}.get(v["gate_passed"] or "", "-")
        decision = approval.get("status", "-") + ("*" if approval.get("override") == "true" else "")
        marks = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
        print(
            f"{v['version']:>7}  {v['serving_version'] or '-':>6}  {gate:<6} {decision:<10} "
            f"{approval.get('by', '-'):<12} {approval.get('at', '-'):<26} "
            f"{v['pipeline_run'] or '-'}{marks}"
            + (f" — {approval['comment']}" if approval.get("comment") else "")
        )
        if v["rollback"]:
            print(
                f"{'':>17}rolled back to by {v['rollback'].get('by')} at {v['rollback'].get('at')}"
            )
    print("(* = approved as an override of a failed gate)")
    return 0


def _move_stable(args: argparse.Namespace) -> int:
    from tumorflow.components.release.deploy import DeployRefused, promote_canary, rollback
    from tumorflow.components.release.trust_root import DecisionRefused

    tracking_uri, model_name, base, keep_versions = _store(args)
    tracking_uri = _existing_store(tracking_uri)
    try:
        trust, signer, audit_log = _signing(args)
    except DecisionRefused as exc:
        raise DeployRefused(str(exc)) from None
    signing = {
        "keep_versions": keep_versions,
        "trust": trust,
        "signer": signer,
        "reason": args.reason or "",
        "audit_log": audit_log,
    }
    if args.command == "promote":
        result = promote_canary(tracking_uri, model_name, base, **signing)
    else:
        result = rollback(tracking_uri, model_name, base, args.to, **signing)
    champion = (
        f", registry champion -> version {result.champion_version}"
        if result.champion_version
        else ""
    )
    print(
        f"{model_name}: stable -> served version {result.stable} (was {result.replaced})"
        f"{champion}, signed by {signer.identity}"
    )
    return 0


def _signing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key",
        metavar="PATH",
        help="your SSH signing key (OpenSSH Ed25519; default: release.signing_key, "
        "~/.ssh/id_ed25519, or the key a local run made under its run root)",
    )
    parser.add_argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="refuse unless the trust root names the key NAME (the identity is always the key's)",
    )
    # Gone: the identity is the trust root's name of the signing key. Kept to say so.
    parser.add_argument("--by", help=argparse.SUPPRESS)


def _common(parser: argparse.ArgumentParser, *, model_name_help: str) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: from the configuration)"
    )
    parser.add_argument("--model-name", "--model_name", dest="model_name", help=model_name_help)


def _served_model(parser: argparse.ArgumentParser) -> None:
    """Flags of the commands that act on a served model: its base path, name and store."""
    parser.add_argument(
        "--model-base-path", help="TF Serving model base path (default: from the configuration)"
    )
    _common(
        parser,
        model_name_help="registered model / served model name (default: deploy.model_name)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    approve = subparsers.add_parser("approve", help="approve the candidate model of a pipeline run")
    approve.add_argument("run", metavar="RUN", help="pipeline run id (tumorflow.pipeline_run)")
    approve.add_argument("--comment", help="a note stored with the approval")
    approve.add_argument("--override", action="store_true", help="approve although the gate failed")
    approve.add_argument(
        "--reason", help="why the failed gate is overridden (required with --override)"
    )
    _common(approve, model_name_help="restrict the search to this registered model")
    _signing_flags(approve)
    approve.set_defaults(handler=_approve)

    reject = subparsers.add_parser("reject", help="reject the candidate model of a pipeline run")
    reject.add_argument("run", metavar="RUN", help="pipeline run id (tumorflow.pipeline_run)")
    reject.add_argument("--reason", required=True, help="why the model is rejected")
    _common(reject, model_name_help="restrict the search to this registered model")
    _signing_flags(reject)
    reject.set_defaults(handler=_reject)

    status = subparsers.add_parser("status", help="served versions, labels, aliases, recent runs")
    status.add_argument(
        "--last", type=int, default=10, help="how many recent model versions to list"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    _served_model(status)
    status.set_defaults(handler=_status)

    back = subparsers.add_parser(
        "rollback", help="serve an earlier version again, without retraining"
    )
    back.add_argument(
        "--to", type=int, metavar="VERSION", help="served version to restore (default: previous)"
    )
    back.add_argument("--reason", help="why, recorded in the signed record")
    _signing_flags(back)
    _served_model(back)
    back.set_defaults(handler=_move_stable)

    promote = subparsers.add_parser(
        "promote", help="make the canary version stable (deploy.rollout=canary)"
    )
    promote.add_argument("--reason", help="why, recorded in the signed record")
    _signing_flags(promote)
    _served_model(promote)
    promote.set_defaults(handler=_move_stable)
