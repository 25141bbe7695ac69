"""`tumorflow policy set|show`: the approval policy stored with a registered model.

Every run that would deploy the model obeys it (a run's `gate.approval` may only be stricter).
Who set it is the OS user running the command; there is no flag to name someone else.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from tumorflow.cli.model import _store
from tumorflow.cli.pipeline import add_config_arguments
from tumorflow.components.release.approval_rules import APPROVAL_MODES


def _print_policy(model_name: str, policy, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"model_name": model_name, **(asdict(policy) if policy else {})}))
        return
    if policy is None:
        print(
            f"{model_name}: no approval policy stored; each run's gate.approval applies, and the "
            "first run that registers a candidate stores it"
        )
        return
    print(f"model          {model_name}")
    print(f"approval       {policy.approval}")
    print(f"approvers      {', '.join(policy.approvers) or 'anyone'}")
    print(f"set by         {policy.set_by or '-'} at {policy.set_at or '-'}")


def _set(args: argparse.Namespace) -> int:
    from tumorflow.components.release.approval import set_model_policy

    tracking_uri, model_name, _, _ = _store(args)
    policy = set_model_policy(tracking_uri, model_name, args.approval, args.approvers)
    _print_policy(model_name, policy, as_json=args.json)
    return 0


def _show(args: argparse.Namespace) -> int:
    from tumorflow.components.release import registry

    tracking_uri, model_name, _, _ = _store(args)
    policy = registry.get_approval_policy(registry.connect(tracking_uri), model_name)
    _print_policy(model_name, policy, as_json=args.json)
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_name", metavar="MODEL", help="registered model name")
    add_config_arguments(parser)
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: from the configuration)"
    )
    parser.add_argument("--json", action="store_true", help="print the policy as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    policy = subparsers.add_parser(
        "policy", help="the approval policy of a registered model (auto or manual, approvers)"
    )
    commands = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    set_ = commands.add_parser("set", help="store the approval policy every run of the model obeys")
    _model_arguments(set_)
    set_.add_argument(
        "--approval",
        choices=APPROVAL_MODES,
        help="manual: every run waits for `tumorflow approve`; a run cannot lower it "
        "(default: keep the stored one)",
    )
    set_.add_argument(
        "--approvers",
        metavar="A,B",
        help="comma-separated identities that may approve or reject; '' for anyone "
        "(default: keep the stored list)",
    )
    set_.set_defaults(handler=_set)

    show = commands.add_parser("show", help="print the stored approval policy")
    _model_arguments(show)
    show.set_defaults(handler=_show)
