"""`tumorflow policy set|show`: a model's approval policy, as the trust root holds it.

The policy (auto or manual, the approvers and operators) lives in the trust root, outside the
registry (docs/signing.md); every run obeys it (a run's `gate.approval` may only be stricter).
`set` is a signed decision of one of the model's approvers: it edits a local trust file, or
prints what to put into the trust root when that is a Secret or a gs:// object.
"""

from __future__ import annotations

import argparse
import json

import yaml

from tumorflow.cli.model import _signing, _signing_flags
from tumorflow.cli.pipeline import add_config_arguments, config_from_args
from tumorflow.components.release.approval_rules import APPROVAL_MODES


def _print_policy(model_name: str, trust, *, as_json: bool) -> None:
    approval, approvers, operators = trust.policy(model_name)
    listed = model_name in trust.models
    if as_json:
        print(
            json.dumps(
                {
                    "model_name": model_name,
                    "approval": approval,
                    "approvers": list(approvers),
                    "operators": list(operators),
                    "trust_root": trust.source,
                    "entry": model_name if listed else "*",
                }
            )
        )
        return
    print(f"model          {model_name}")
    print(f"trust root     {trust.source}" + ("" if listed else "   (its '*' entry)"))
    print(f"approval       {approval}")
    print(f"approvers      {', '.join(approvers) or 'nobody'}")
    print(f"operators      {', '.join(operators) or 'the approvers only'}")


def _names(text: str | None, kept: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        return kept
    return tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def _set(args: argparse.Namespace) -> int:
    from tumorflow.components.release.approval_rules import ApprovalError
    from tumorflow.components.release.deploy import AUDIT_WHAT, audit_event
    from tumorflow.components.release.trust_root import DecisionRefused, ModelPolicy, sign_decision
    from tumorflow.core import storage

    config = config_from_args(args)
    try:
        trust, signer, audit_log = _signing(args)
        current = trust.model_policy(args.model_name)
        policy = ModelPolicy(
            args.approval or current.approval,
            _names(args.approvers, current.approvers),
            _names(args.operators, current.operators),
        )
        signed = sign_decision(
            signer,
            "policy",
            model_name=args.model_name,
            reason=f"approval {policy.approval}; approvers {', '.join(policy.approvers)}; "
            f"operators {', '.join(policy.operators)}",
        )
        trust.verify(signed, action="policy", model_name=args.model_name)
    except DecisionRefused as exc:
        raise ApprovalError(f"policy not changed: {exc}") from None
    trust.models[args.model_name] = policy
    uri = config.resolved_trust_root()
    if storage.is_remote(uri) or args.print_only:
        entry = {
            args.model_name: {
                "approval": policy.approval,
                "approvers": list(policy.approvers),
                "operators": list(policy.operators),
            }
        }
        print(f"put this under models: in the trust root {uri} (a Secret or its own object):")
        print(yaml.safe_dump(entry, sort_keys=False), end="")
    else:
        trust.save(uri)
        print(f"edited the local trust root {uri} (signed by {signer.identity})")
    audit_event(
        audit_log,
        signer.identity,
        AUDIT_WHAT["policy"],
        signed.record["reason"],
        signer=signer,
        decision=signed,
        model_name=args.model_name,
    )
    _print_policy(args.model_name, trust, as_json=args.json)
    return 0


def _show(args: argparse.Namespace) -> int:
    from tumorflow.components.release.trust_root import TrustRoot

    config = config_from_args(args)
    _print_policy(args.model_name, TrustRoot.load(config.resolved_trust_root()), as_json=args.json)
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_name", metavar="MODEL", help="registered model name")
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the policy as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    policy = subparsers.add_parser(
        "policy", help="a model's approval policy in the trust root (mode, approvers, operators)"
    )
    commands = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    set_ = commands.add_parser(
        "set", help="change a model's policy (signed; edits a local trust root)"
    )
    _model_arguments(set_)
    set_.add_argument(
        "--approval",
        choices=APPROVAL_MODES,
        help="manual: every run waits for a signed approval; a run cannot lower it "
        "(default: keep the current one)",
    )
    set_.add_argument(
        "--approvers",
        metavar="A,B",
        help="trust-root names that may approve or reject (default: keep the current list)",
    )
    set_.add_argument(
        "--operators",
        metavar="A,B",
        help="trust-root names that may also roll back and promote (default: keep them)",
    )
    set_.add_argument(
        "--print-only",
        action="store_true",
        help="print the trust root entry instead of editing a local trust file",
    )
    _signing_flags(set_)
    set_.set_defaults(handler=_set)

    show = commands.add_parser("show", help="print the model's policy from the trust root")
    _model_arguments(show)
    show.set_defaults(handler=_show)
