"""`tumorflow route`: watch a PACS, classify each new image with the model server, and store the
result back as a DICOM Structured Report (optionally with a Grad-CAM Secondary Capture).

Runs until stopped (a pass every route.poll_seconds); `--once` makes one pass, `--study UID ...`
routes those studies once, `--retry-dead-letters` stores the results the PACS refused earlier,
`--status` prints the backlog. Settings: the `route` section of --config (docs/pacs.md).
"""

from __future__ import annotations

import argparse

from tumorflow.cli.pipeline import add_config_arguments, config_from_args


def _route(args: argparse.Namespace) -> int:
    import signal
    import threading

    from tumorflow.serving.pacs_router import RouterMetrics, RouteState, build_router

    overrides = []
    if args.model_server:
        overrides.append(f"route.model_server={args.model_server}")
    if args.secondary_capture:
        overrides.append("route.secondary_capture=true")
    if args.metrics_port is not None:
        overrides.append(f"route.metrics_port={args.metrics_port}")
    if args.state_file:
        overrides.append(f"route.state_file={args.state_file}")
    args.overrides = [*args.overrides, *overrides]
    config = config_from_args(args, default_preset=None)
    route = config.route
    state_file = config.resolved_route_state()
    if args.status:
        backlog = RouteState.load(state_file)
        print(_status_text(backlog))
        return 0
    metrics = RouterMetrics()
    router = build_router(
        route,
        config.dataset.dicom,
        args.model_name or route.model_name or config.deploy.model_name,
        state_file,
        studies=args.study,
        model_base_path=route.model_base_path or config.resolved_model_base_path(),
        metrics=metrics,
    )
    if args.retry_dead_letters:
        result = router.retry_dead_letters()
        print(f"tumorflow route: {result.line()}")
        return 0 if not result.dead_letter else 1
    if args.once or args.study:
        result = router.run_pass()
        print(f"tumorflow route: {result.line()}")
        return 0 if not (result.pending or result.dead_letter) else 1
    http = metrics.serve(route.metrics_port, route.metrics_host) if route.metrics_port else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(
        f"tumorflow route: watching {route.dicomweb_url} ({route.watch}) every "
        f"{route.poll_seconds:g}s; state {state_file}",
        flush=True,
    )
    try:
        router.run_forever(stop, lambda result: print(f"pass: {result.line()}", flush=True))
    finally:
        if http is not None:
            http.shutdown()
    return 0


def _status_text(state) -> str:
    backlog = state.backlog()
    lines = [
        f"route state {state.path}: {backlog['done']} results stored, {backlog['pending']} "
        f"pending, {backlog['dead_letter']} dead letters, {backlog['skipped']} skipped; changes "
        f"cursor {state.changes_since}"
    ]
    for sop, entry in sorted(state.pending.items()):
        lines.append(f"  pending  {sop} (attempts {entry.get('attempts', 0)}): {entry['reason']}")
    for uid, entry in sorted(state.dead_letter.items()):
        lines.append(f"  dead letter {uid} of {entry['sop']}: {entry['reason']}")
    for sop, reason in sorted(state.skipped.items()):
        lines.append(f"  skipped  {sop}: {reason}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "route",
        help="classify a PACS's new images and store the results back as DICOM SR",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--study", nargs="+", metavar="UID", help="route these studies once, then exit"
    )
    which.add_argument("--once", action="store_true", help="one pass of the watcher, then exit")
    which.add_argument(
        "--retry-dead-letters",
        action="store_true",
        help="store the results the PACS did not take earlier, then exit",
    )
    which.add_argument("--status", action="store_true", help="print the backlog and exit")
    parser.add_argument(
        "--model-server",
        "--server",
        dest="model_server",
        help="gRPC HOST:PORT (route.model_server)",
    )
    parser.add_argument(
        "--model-name",
        "--model_name",
        dest="model_name",
        help="served model (default: route.model_name, else deploy.model_name)",
    )
    parser.add_argument(
        "--secondary-capture",
        action="store_true",
        help="also store a Grad-CAM Secondary Capture (the model's explain signature)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (route.metrics_port)",
    )
    parser.add_argument("--state-file", help="the router's state (route.state_file)")
    add_config_arguments(parser)
    parser.set_defaults(handler=_route)
