"""The `tumorflow` command: one entry point, a subcommand per task.

Each group of subcommands lives in `tumorflow.cli.<group>` and registers itself
with `register(subparsers)`; handlers import heavy libraries (TensorFlow, KFP, MLflow) lazily so
that `tumorflow --help` stays instant. Errors a user can fix are shown without a traceback.

Quiet by default: TensorFlow's native start-up lines and third-party INFO logs stay off the
terminal, a pipeline run shows one line per task; `-v` brings everything back.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types
from collections.abc import Iterator, Sequence

from tumorflow import __version__
from tumorflow.cli import (
    bench,
    data,
    drift,
    model,
    pipeline,
    policy,
    release,
    route,
    schedule,
    serve,
    ui,
    weights,
)
from tumorflow.core.errors import TumorflowError

EPILOG = """\
flags: tumorflow's own flags are kebab-case (--model-name, --run-root); `serve` and `predict` take
TensorFlow Serving's own flag names (--model_config_file, --model_name, --port, ...) so that they can
be copied from TF Serving's documentation. Where a command mixes both styles, either spelling is
accepted. Every command that reads or writes a run takes --run-root DIR (default: runs).

output: quiet by default; -v shows TensorFlow's native logs, kfp.local's own output and debug logs.
"""

# TensorFlow's C++ logging reads its level once, when its libraries load: 3 hides the `cuInit`
# "CUDA error" of every CPU machine as well as INFO and WARNING lines. Task subprocesses inherit it.
_QUIET_TF_LOG_LEVEL = "3"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tumorflow",
        description="Retrain, gate and serve CT/MRI tumor classifiers as a Kubeflow-style pipeline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tumorflow {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show TensorFlow's and kfp.local's own output and debug logs",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (
        data,
        pipeline,
        schedule,
        model,
        policy,
        release,
        serve,
        route,
        drift,
        bench,
        ui,
        weights,
    ):
        group.register(subparsers)
    return parser


def configure_output(verbose: bool) -> None:
    """Logging and TensorFlow's native log level, set before anything imports TensorFlow.

    An explicit TF_CPP_MIN_LOG_LEVEL or MLFLOW_LOGGING_LEVEL in the environment wins over the
    quiet default.
    """
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _QUIET_TF_LOG_LEVEL)
        # MLflow configures its own loggers (database creation and migration lines) from this.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The project's own INFO lines (a server's "serving version 3", a swap) stay visible.
    logging.getLogger("tumorflow").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # MLflow reads MLFLOW_LOGGING_LEVEL once, when first imported; where it already was (a
        # library user's process, a test worker), its loggers get the same level here.
        level = os.environ["MLFLOW_LOGGING_LEVEL"].upper()
        logging.getLogger("mlflow").setLevel(
            level if level in logging.getLevelNamesMapping() else "WARNING"
        )


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null: what C++ writes there is dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of `tensorflow` with native stderr silenced."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        with _native_stderr_silenced():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)


class QuietTensorflowImport(importlib.abc.MetaPathFinder):
    """Imports TensorFlow, whenever a handler first does, with native stderr silenced.

    While its native libraries load, TensorFlow writes absl lines (the oneDNN notice, "Could not
    find cuda drivers", "All log messages before absl::InitializeLog()") straight to file
    descriptor 2, before TF_CPP_MIN_LOG_LEVEL applies. Commands that never import TensorFlow do
    not pay for its import.
    """

    def find_spec(self, fullname: str, path: object, target: object = None):
        if fullname != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_output(args.verbose)
    quiet_import = QuietTensorflowImport()
    if not args.verbose and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, quiet_import)
    try:
        return int(args.handler(args) or 0)
    except TumorflowError as exc:
        print(f"tumorflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tumorflow {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if quiet_import in sys.meta_path:
            sys.meta_path.remove(quiet_import)


if __name__ == "__main__":
    sys.exit(main())
