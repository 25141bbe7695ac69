"""The `tumorflow` command: one entry point, a subcommand per task.

Each group of subcommands lives in `tumorflow.cli.<group>` and registers itself
with `register(subparsers)`; handlers import heavy libraries (TensorFlow, KFP, MLflow) lazily so
that `tumorflow --help` stays instant. Errors a user can fix are shown without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tumorflow import __version__
from tumorflow.cli import bench, data, drift, model, pipeline, policy, schedule, serve
from tumorflow.core.errors import TumorflowError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tumorflow",
        description="Retrain, gate and serve CT/MRI tumor classifiers as a Kubeflow-style pipeline.",
    )
    parser.add_argument("--version", action="version", version=f"tumorflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (data, pipeline, schedule, model, policy, serve, drift, bench):
        group.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.handler(args) or 0)
    except TumorflowError as exc:
        print(f"tumorflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tumorflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
