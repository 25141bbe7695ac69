"""Fixtures of the serving tests: tiny SavedModels in TF Serving's layout and a live server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, image_bytes

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASSES = ("normal", "tumor", "cyst")
IMAGE_SIZE = 16


def build_bytes_model(path: Path, seed: int = 0) -> Path:
    """A SavedModel with tumorflow's export signature: `image_bytes` string [batch] in."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    features = IMAGE_SIZE * IMAGE_SIZE * 3

    class Classifier(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = tf.Variable(rng.normal(0, 0.05, (features, 8)).astype("float32"))
            self.head = tf.Variable(rng.normal(0, 0.5, (8, len(CLASSES))).astype("float32"))
            self.classes = tf.constant(CLASSES)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
            def decode(data: tf.Tensor) -> tf.Tensor:
                image = tf.io.decode_image(data, channels=3, expand_animations=False)
                return tf.image.resize(tf.cast(image, tf.float32), [IMAGE_SIZE, IMAGE_SIZE])

            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32)
            flat = tf.reshape(images / 255.0, [-1, features])
            embedding = tf.nn.relu(flat @ self.hidden)
            scores = tf.nn.softmax(embedding @ self.head)
            index = tf.argmax(scores, axis=1)
            batch = tf.shape(image_bytes)[0]
            return {
                "scores": scores,
                "classes": tf.tile(self.classes[tf.newaxis], [batch, 1]),
                "predicted_class": tf.gather(self.classes, index),
                "predicted_index": index,
                "embedding": embedding,
            }

    module = Classifier()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def build_keras_model(path: Path) -> tuple[Path, object]:
    """A third-party model: plain Keras, float input, exported with `model.export`."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(6, activation="relu")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(hidden)
    model = keras.Model(inputs, outputs)
    model.export(str(path), format="tf_saved_model", verbose=False)
    return path, model


@pytest.fixture(scope="session")
def bytes_model_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bytes_model(tmp_path_factory.mktemp("bytes-model") / "v1", seed=1)


@pytest.fixture(scope="session")
def bytes_model_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bytes_model(tmp_path_factory.mktemp("bytes-model") / "v2", seed=2)


@pytest.fixture(scope="session")
def keras_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    return build_keras_model(tmp_path_factory.mktemp("keras-model") / "export")


@pytest.fixture(scope="module")
def model_base(
    tmp_path_factory: pytest.TempPathFactory,
    bytes_model_v1: Path,
    bytes_model_v2: Path,
    keras_model: tuple[Path, object],
) -> Path:
    """`<base>/tumor/{1,2}` (both served, labels stable=1, canary=2) and `<base>/keras/1`."""
    import shutil

    base = tmp_path_factory.mktemp("models")
    shutil.copytree(bytes_model_v1, base / "tumor" / "1")
    shutil.copytree(bytes_model_v2, base / "tumor" / "2")
    shutil.copytree(keras_model[0], base / "keras" / "1")
    (base / "models.config").write_text(
        f"""model_config_list {{
  config {{
    name: "tumor"
    base_path: "{base / "tumor"}"
    model_platform: "tensorflow"
    model_version_policy {{ all {{}} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
  config {{
    name: "keras"
    base_path: "{base / "keras"}"
    model_platform: "tensorflow"
  }}
}}
"""
    )
    return base


@pytest.fixture(scope="module")
def server(model_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One in-process server per module: gRPC + REST on free loopback ports, batching on."""
    from tumorflow.serving.server import ModelServer, ServerOptions

    batching = tmp_path_factory.mktemp("batching") / "batching.config"
    batching.write_text(
        "max_batch_size { value: 16 }\nbatch_timeout_micros { value: 20000 }\n"
        "max_enqueued_batches { value: 4 }\nnum_batch_threads { value: 2 }\n"
    )
    options = ServerOptions(
        port=0,
        rest_api_port=free_port(),
        model_config_file=str(model_base / "models.config"),
        file_system_poll_wait_seconds=0.2,
        enable_batching=True,
        batching_parameters_file=str(batching),
        max_receive_message_length=1024 * 1024,
    )
    model_server = ModelServer(options)
    model_server.start()
    yield model_server
    model_server.stop()


@pytest.fixture(scope="session")
def image() -> object:
    """`image(seed, size=24, mode="RGB")` → PNG bytes of random pixels (`helpers.image_bytes`)."""
    return image_bytes


@pytest.fixture(scope="session")
def classes() -> tuple[str, ...]:
    return CLASSES


@pytest.fixture()
def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()
