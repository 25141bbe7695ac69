"""`tumorflow serve` (a TF-Serving-compatible model server) and `tumorflow predict` (its client).

`serve` takes `tensorflow_model_server`'s flags, in its `--flag=value` form too, so that it is a
drop-in; it runs the real binary when that is on PATH (or `--backend tfserving`), else serves
in-process. Unlike TF Serving it binds loopback unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tumorflow.cli.pipeline import add_config_arguments
from tumorflow.core.config import DriftConfig


def _flag(text: str) -> bool:
    """TF Serving's boolean flags: `--enable_batching`, `--enable_batching=true|false`."""
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `tensorflow_model_server` flags `tumorflow serve` understands."""
    add = parser.add_argument
    add("--port", type=int, default=8500, help="gRPC port (default 8500)")
    add("--rest_api_port", type=int, default=8501, help="REST port (default 8501; 0 disables REST)")
    add("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    add("--model_name", default="default", help="model name with --model_base_path")
    add(
        "--model_base_path",
        default="",
        help="folder (or gs:// URI) holding <version>/saved_model.pb",
    )
    add(
        "--model_config_file",
        default="",
        help="ModelServerConfig text proto: models, policies, labels",
    )
    add(
        "--trust_root",
        default="",
        help="trust root (YAML) a version's signed release record must verify against "
        "(default: trust_root.yaml beside --model_config_file or up to two folders above; "
        "'none': load unsigned versions)",
    )
    add(
        "--model_config_file_poll_wait_seconds",
        type=float,
        default=0.0,
        help="re-read the config file (0: never)",
    )
    add(
        "--file_system_poll_wait_seconds",
        type=float,
        default=1.0,
        help="look for new versions every N s",
    )
    add(
        "--enable_batching",
        type=_flag,
        nargs="?",
        const=True,
        default=False,
        help="merge concurrent requests",
    )
    add("--batching_parameters_file", default="", help="BatchingParameters text proto")
    add("--grpc_max_threads", type=int, default=64, help="gRPC worker threads")
    add("--rest_api_num_threads", type=int, default=16, help="REST worker threads")
    add(
        "--max_receive_message_length",
        type=int,
        default=64 * 1024 * 1024,
        help="largest request in bytes (gRPC message and REST body)",
    )
    add("--request_log_dir", default="", help="log sampled requests for drift under this URI")
    add(
        "--request_log_sample_rate",
        type=float,
        default=DriftConfig().request_sample_rate,
        help="share of requests logged (default: drift.request_sample_rate, %(default)s)",
    )
    add(
        "--backend",
        choices=("auto", "inprocess", "tfserving"),
        default="auto",
        help="auto: tensorflow_model_server when on PATH, else in-process",
    )


def _serve(args: argparse.Namespace) -> int:
    from tumorflow.serving.server import ServerOptions, serve

    fields = ServerOptions.__dataclass_fields__
    options = ServerOptions(**{name: getattr(args, name) for name in fields if hasattr(args, name)})
    return serve(options)


def _predict(args: argparse.Namespace) -> int:
    """One line per image: its class and probabilities, or why it has none; exit 2 when any
    image could not be read or was refused, after answering the others."""
    import sys

    from tumorflow.cli.pipeline import config_from_args
    from tumorflow.components.evaluation.overlays import overlay_heatmap
    from tumorflow.core.errors import ConfigError
    from tumorflow.serving.client import (
        ExplainedPrediction,
        encoded_images,
        explain_grpc,
        predict_each,
        predict_grpc,
        predict_rest,
    )

    if args.explain and args.rest:
        raise ConfigError("--explain asks the gRPC API; drop --rest and give the gRPC port")
    config = config_from_args(args, default_preset=None)
    dicom_config = config.dataset.dicom
    readable: list[tuple[str, bytes]] = []
    failed = False
    for path in args.images:
        try:
            readable.extend(encoded_images(path, Path(path).read_bytes(), dicom_config))
        except OSError as exc:
            print(f"{path}: error: cannot read it: {exc.strerror}", file=sys.stderr)
            failed = True
        except ValueError as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            failed = True
    if not readable:
        return 2
    target = predict_target(args, config)
    predict = explain_grpc if args.explain else predict_rest if args.rest else predict_grpc
    answers = predict_each(
        predict,
        args.server,
        [data for _, data in readable],
        target,
        timeout=args.timeout,
    )
    if args.explain:
        Path(args.explain).mkdir(parents=True, exist_ok=True)
    for (path, data), answer in zip(readable, answers, strict=True):
        if isinstance(answer, Exception):
            print(f"{path}: error: {answer}", file=sys.stderr)
            failed = True
            continue
        overlay = ""
        if isinstance(answer, ExplainedPrediction):
            target_file = Path(args.explain) / f"{Path(path).stem}.gradcam.png"
            target_file.write_bytes(overlay_heatmap(data, answer.heatmap))
            overlay, answer = f"  overlay={target_file}", answer.prediction
        version = f" (v{answer.model_version})" if answer.model_version else ""
        if not answer.in_distribution:
            print(f"{path}: {answer.label}{version}")
            continue
        probabilities = "  ".join(f"{name}={p:.4f}" for name, p in answer.probabilities.items())
        print(f"{path}: {answer.label}{version}  {probabilities}{overlay}")
    return 2 if failed else 0


def predict_target(args: argparse.Namespace, config: Any) -> Any:
    """The served model `predict` asks: `--model_name`, else the config's `deploy.model_name`
    (so `--preset brain_mri` asks brain-mri), with the version or label given."""
    from tumorflow.serving.client import ModelTarget

    return ModelTarget(
        args.model_name or config.deploy.model_name,
        args.model_version,
        args.version_label,
        args.signature_name,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    serve_parser = subparsers.add_parser(
        "serve",
        help="serve SavedModels with TF Serving's gRPC and REST APIs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(handler=_serve)

    predict_parser = subparsers.add_parser(
        "predict", help="classify images with a running model server"
    )
    predict_parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="encoded image files (JPEG, PNG, ...) or DICOM files, converted here with the "
        "dataset.dicom window of --preset/--config/--set",
    )
    predict_parser.add_argument(
        "--server", default="127.0.0.1:8500", help="HOST:PORT (gRPC, or REST with --rest)"
    )
    predict_parser.add_argument(
        "--model_name",
        "--model-name",
        dest="model_name",
        help="served model name (default: deploy.model_name of --preset/--config, kidney-ct "
        "without either)",
    )
    which = predict_parser.add_mutually_exclusive_group()
    which.add_argument("--model_version", type=int, help="a specific version")
    which.add_argument("--version_label", help="a version label such as stable or canary")
    predict_parser.add_argument("--signature_name", default="", help="default: serving_default")
    predict_parser.add_argument(
        "--rest", action="store_true", help="use the REST API instead of gRPC"
    )
    predict_parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    predict_parser.add_argument(
        "--explain",
        metavar="OUT_DIR",
        default="",
        help="ask the model's explain signature (gRPC) and write Grad-CAM overlays into OUT_DIR",
    )
    add_config_arguments(predict_parser)
    predict_parser.set_defaults(handler=_predict)
