"""`tumorflow release show|diff` (a version's release record, the change between two) and
`tumorflow audit verify` (the hash-chained audit log)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tumorflow.cli.pipeline import add_config_arguments


def _sources(args: argparse.Namespace):
    """(tracking URI, run root, audit log, trust root or None) from flags and configuration."""
    from tumorflow.cli.model import _existing_store
    from tumorflow.cli.pipeline import config_from_args
    from tumorflow.pipelines.release_sources import load_trust

    config = config_from_args(args)
    tracking_uri = _existing_store(args.tracking_uri or config.resolved_tracking_uri())
    audit_log = getattr(args, "log", None) or config.resolved_audit_log()
    return tracking_uri, config.run_root, audit_log, load_trust(config.resolved_trust_root())


def _record(args: argparse.Namespace, version: str, sources) -> dict:
    from tumorflow.pipelines.release_sources import release_record_of

    tracking_uri, run_root, audit_log, trust = sources
    return release_record_of(
        tracking_uri, run_root, args.model_name, version, audit_log_uri=audit_log, trust=trust
    )


def _emit(args: argparse.Namespace, title: str, text: str, data: dict) -> None:
    from tumorflow.components.release.release_record import render_html

    if args.html:
        Path(args.html).write_text(render_html(title, text, data), encoding="utf-8")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif not args.html:
        print(text)
    else:
        print(f"{title}: written to {args.html}")


def _show(args: argparse.Namespace) -> int:
    from tumorflow.components.release.release_record import render_text

    record = _record(args, args.version, _sources(args))
    title = f"Release record of {args.model_name} version {args.version}"
    _emit(args, title, render_text(record), record)
    return 0


def _diff(args: argparse.Namespace) -> int:
    from tumorflow.components.release.release_record import diff, render_diff_text

    sources = _sources(args)
    change = diff(_record(args, args.old, sources), _record(args, args.new, sources))
    title = f"Change record of {args.model_name}: version {args.old} to {args.new}"
    _emit(args, title, render_diff_text(change), change)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tumorflow.cli.pipeline import config_from_args
    from tumorflow.components.release import audit_log
    from tumorflow.pipelines.release_sources import load_trust

    config = config_from_args(args)
    log = args.log or config.resolved_audit_log()
    trust = load_trust(config.resolved_trust_root())
    verdict = audit_log.verify(log, trust)
    if args.json:
        print(json.dumps({"log": log, **verdict.to_dict()}))
    else:
        state = "OK" if verdict.ok else "TAMPERED"
        checked = "against the trust root" if trust is not None else "without a trust root"
        print(f"{log}: {state} ({checked}): {verdict.why}")
        if verdict.first_bad is not None:
            print(f"first bad entry: {verdict.first_bad}")
    return 0 if verdict.ok else 1


def _common(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: from the configuration)"
    )
    parser.add_argument("--log", metavar="URI", help="audit log (default: console.audit_log)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--html", metavar="FILE", help="also write a page a reviewer can file")


def register(subparsers: argparse._SubParsersAction) -> None:
    release = subparsers.add_parser(
        "release", help="a version's release record (data, metrics, signed decisions), or a diff"
    )
    commands = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    show = commands.add_parser("show", help="the release record of one registered version")
    show.add_argument("model_name", metavar="MODEL")
    show.add_argument("version", metavar="VERSION", help="registry version")
    _common(show)
    show.set_defaults(handler=_show)
    diff = commands.add_parser(
        "diff", help="what changed between two versions: data, config, metrics, who approved"
    )
    diff.add_argument("model_name", metavar="MODEL")
    diff.add_argument("old", metavar="V1")
    diff.add_argument("new", metavar="V2")
    _common(diff)
    diff.set_defaults(handler=_diff)

    audit = subparsers.add_parser("audit", help="check the hash-chained audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check the chain and signed head; name the first entry changed or removed"
    )
    add_config_arguments(verify)
    verify.add_argument("--log", metavar="URI", help="audit log (default: console.audit_log)")
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verify.set_defaults(handler=_verify)
