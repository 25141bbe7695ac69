"""`tumorflow serve` flags, the tensorflow_model_server command line, startup errors, request log."""

from __future__ import annotations

import argparse
import shutil

import grpc
import pytest
from helpers import wait_until

from tumorflow.cli.serve import add_serve_arguments
from tumorflow.core.errors import ConfigError
from tumorflow.serving.server import ServerOptions, tfserving_argv, use_tfserving


def parse(argv: list[str]) -> ServerOptions:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = vars(parser.parse_args(argv))
    return ServerOptions(
        **{k: v for k, v in args.items() if k in ServerOptions.__dataclass_fields__}
    )


def test_tf_serving_flag_syntax_is_accepted() -> None:
    options = parse(
        [
            "--port=9000",
            "--rest_api_port=0",
            "--model_name=kidney",
            "--model_base_path=gs://b/m",
            "--enable_batching=true",
            "--file_system_poll_wait_seconds=5",
        ]
    )
    assert (options.port, options.rest_api_port, options.model_name) == (9000, 0, "kidney")
    assert options.enable_batching is True and options.host == "127.0.0.1"
    assert parse(["--enable_batching"]).enable_batching is True
    assert parse(["--enable_batching=false"]).enable_batching is False
    with pytest.raises(SystemExit):
        parse(["--enable_batching=maybe"])


def test_tfserving_argv_forwards_the_same_flags() -> None:
    options = parse(
        [
            "--port=9000",
            "--model_config_file=/cfg/models.config",
            "--model_config_file_poll_wait_seconds=60",
            "--enable_batching",
            "--batching_parameters_file=/cfg/batching.config",
            "--max_receive_message_length=1024",
        ]
    )
    argv = tfserving_argv(options, "/usr/bin/tensorflow_model_server", "/tmp/monitoring.config")
    assert argv[0] == "/usr/bin/tensorflow_model_server"
    assert "--port=9000" in argv and "--rest_api_port=8501" in argv
    assert "--model_config_file=/cfg/models.config" in argv
    assert "--model_config_file_poll_wait_seconds=60" in argv
    assert (
        "--enable_batching=true" in argv
        and "--batching_parameters_file=/cfg/batching.config" in argv
    )
    assert "--grpc_channel_arguments=grpc.max_receive_message_length=1024" in argv
    assert "--monitoring_config_file=/tmp/monitoring.config" in argv
    assert not any(a.startswith("--model_base_path") for a in argv)
    single = tfserving_argv(parse(["--model_name=m", "--model_base_path=/models/m"]))
    assert "--model_name=m" in single and "--model_base_path=/models/m" in single
    assert "--enable_batching=true" not in single


def test_backend_choice() -> None:
    assert use_tfserving(ServerOptions(backend="inprocess")) is None
    if shutil.which("tensorflow_model_server") is None:
        assert use_tfserving(ServerOptions(backend="auto")) is None
        with pytest.raises(ConfigError, match="tensorflow_model_server"):
            use_tfserving(ServerOptions(backend="tfserving"))


def test_options_need_one_model_source(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--model_base_path"):
        ServerOptions().model_config()
    with pytest.raises(ConfigError, match="not both"):
        ServerOptions(model_base_path="/m", model_config_file="/c").model_config()


@pytest.mark.service
def test_requests_are_logged_for_drift(tmp_path, bytes_model_v1, image) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tumorflow.serving.server import ModelServer

    shutil.copytree(bytes_model_v1, tmp_path / "models" / "1")
    server = ModelServer(
        ServerOptions(
            port=0,
            rest_api_port=0,
            model_name="tumor",
            model_base_path=str(tmp_path / "models"),
            request_log_dir=str(tmp_path / "log"),
            file_system_poll_wait_seconds=0,
        )
    )
    server.start()
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tumor"
        request.inputs["image_bytes"].CopyFrom(
            tf.make_tensor_proto([image(1), image(2)], dtype=tf.string)
        )
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    finally:
        server.stop()
    (part,) = wait_until(
        lambda: list((tmp_path / "log" / "tumor").rglob("*.parquet")), 30, "a request log part"
    )
    import pyarrow.parquet as pq

    table = pq.read_table(part)
    assert table.num_rows == 2
    assert set(table.column("model_version").to_pylist()) == {1}
