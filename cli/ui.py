"""`tumorflow ui`: the review console, on loopback unless `--host` (or `console.host`) says otherwise."""

from __future__ import annotations

import argparse

from tumorflow.cli.pipeline import add_config_arguments, config_from_args


def _ui(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from tumorflow.console.app import ConsoleSettings, create_app

    config = config_from_args(args)
    console = config.console
    settings = ConsoleSettings(
        console=console,
        run_root=Path(config.run_root).resolve(),
        tracking_uri=args.tracking_uri or config.resolved_tracking_uri(),
        model_base_path=config.resolved_model_base_path(),
        model_name=config.deploy.model_name,
        keep_versions=config.deploy.keep_versions,
        dicom=config.dataset.dicom,
        trust_root=config.resolved_trust_root(),
    )
    host = args.host or console.host
    port = console.port if args.port is None else args.port
    print(f"review console at http://{host}:{port}/ ({console.auth} sign-in)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ui", help="the review console: evidence, decisions, models")
    add_config_arguments(parser)
    parser.add_argument("--host", help="address to bind (default: console.host, loopback)")
    parser.add_argument("--port", type=int, help="port (default: console.port, 8080)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: from the config)")
    parser.set_defaults(handler=_ui)
