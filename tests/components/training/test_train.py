"""Two-stage fine-tuning: stages, freezing, resuming after a kill, and the MLflow record."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import SLOW_TRAINING_CHILD, wait_until, write_synthetic_split

from tumorflow.components.training.backbones import build_backbone, build_classifier
from tumorflow.components.training.checkpoints import LATEST
from tumorflow.components.training.train import (
    LOSS,
    EpochClock,
    _batchnorm_recalibration,
    _set_stage_trainable,
    _validation_pass_class,
    train_model,
    validation_metrics,
    warmup_cosine_rate,
)
from tumorflow.core.config import TrainConfig


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return write_synthetic_split(
        tmp_path_factory.mktemp("split"), {"train": 4, "val": 2}, size=40, seed=5
    )


def _config(**overrides) -> TrainConfig:
    values = {
        "backbone": "mobilenetv2",
        "image_size": 32,
        "batch_size": 8,
        "stage1": {"epochs": 2, "learning_rate": 1e-3},
        "stage2": {"epochs": 2, "learning_rate": 1e-4},
        "unfreeze_top_layers": 12,
        **overrides,
    }
    return TrainConfig.model_validate(values)


def test_stage2_opens_only_the_top_layers_and_never_batchnorm():
    import keras

    model, base = build_classifier("mobilenetv2", 3, 32, "none", 0.1)
    _set_stage_trainable(model, base, "mobilenetv2", 1, 12)
    head_only = len(model.trainable_weights)
    assert head_only == 2

    _set_stage_trainable(model, base, "mobilenetv2", 2, 12)
    top, bottom = base.layers[-12:], base.layers[:-12]
    assert any(layer.trainable for layer in top if layer.weights)
    assert not any(layer.trainable for layer in bottom if layer.weights)
    assert not any(
        layer.trainable
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert head_only < len(model.trainable_weights) < len(model.weights)


@pytest.mark.e2e
def test_two_stages_write_the_model_folder_and_a_rerun_resumes(split_dir, tmp_path, caplog):
    import keras

    result = train_model(split_dir, tmp_path / "model", _config(), tmp_path / "ckpt")

    stages = [(row["stage"], row["epoch"]) for row in result.history]
    assert stages == [(1, 1), (1, 2), (2, 1), (2, 2)]
    stage1_lr = {row["learning_rate"] for row in result.history if row["stage"] == 1}
    stage2_lr = {row["learning_rate"] for row in result.history if row["stage"] == 2}
    assert max(stage2_lr) < min(stage1_lr)
    for name in ("model.keras", "model_info.json", "history.csv", "training_curves.png"):
        assert (tmp_path / "model" / name).stat().st_size > 0
    info = json.loads((tmp_path / "model" / "model_info.json").read_text())
    assert info["image_size"] == [32, 32] and info["epochs_run"] == {"stage1": 2, "stage2": 2}
    assert info["classes"] == ["cyst", "normal", "stone", "tumor"]
    with (tmp_path / "model" / "history.csv").open() as handle:
        assert [row["stage"] for row in csv.DictReader(handle)] == ["1", "1", "2", "2"]
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    assert model.output_shape == (None, 4)

    caplog.set_level("INFO")
    again = train_model(split_dir, tmp_path / "model2", _config(), tmp_path / "ckpt")
    assert "resuming from stage 2 epoch 2" in caplog.text
    assert again.history == result.history
    assert again.info["kept_epoch"] == result.info["kept_epoch"]
    resumed = keras.models.load_model(tmp_path / "model2" / "model.keras")
    assert all(
        (a == b).all() for a, b in zip(model.get_weights(), resumed.get_weights(), strict=True)
    )


_CHILD = (
    """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
"""
    + SLOW_TRAINING_CHILD
)


def _train_in_subprocess(split_dir: Path, workdir: Path, config: TrainConfig, pause: float):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_CHILD),
            str(split_dir),
            str(workdir),
            config.model_dump_json(),
            str(pause),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.mark.e2e
def test_killed_training_resumes_from_the_next_epoch(split_dir, tmp_path):
    config = _config(
        backbone="custom_cnn",
        stage1={"epochs": 3, "learning_rate": 1e-3},
        stage2={"epochs": 1, "learning_rate": 1e-4},
    )
    child = _train_in_subprocess(split_dir, tmp_path, config, pause=30)

    def checkpointed() -> bool:
        assert child.poll() is None, child.communicate()[0]
        return (tmp_path / "ckpt" / LATEST).exists()

    wait_until(checkpointed, 240, "the first epoch's checkpoint")
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert not (tmp_path / "model" / "model.keras").exists()

    rerun = _train_in_subprocess(split_dir, tmp_path, config, pause=0)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output
    assert "resuming from stage 1 epoch 1" in output
    assert "Epoch 1/3" not in output
    assert "Epoch 2/3" in output and "Epoch 3/3" in output
    info = json.loads((tmp_path / "model" / "model_info.json").read_text())
    assert info["epochs_run"] == {"stage1": 3, "stage2": 1}


@pytest.mark.e2e
def test_mlflow_run_has_both_stages_per_epoch_and_the_curves(split_dir, tmp_path, mlflow_server):
    import mlflow

    # Started from a weights file: the run and the model info name it by its digest.
    starting = tmp_path / "start.weights.h5"
    build_backbone("custom_cnn", 32, "none").save_weights(starting)
    result = train_model(
        split_dir,
        tmp_path / "model",
        _config(backbone="custom_cnn", weights=str(starting)),
        tmp_path / "ckpt",
        tracking_uri=mlflow_server,
        experiment="test-train",
        run_tags={"tumorflow.pipeline_run": "run-42"},
    )

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["tumorflow.pipeline_run"] == "run-42"
    assert run.data.params["backbone"] == "custom_cnn"
    assert run.data.params["stage2.learning_rate"] == "0.0001"
    assert run.data.params["data.train_count"] == "16"
    stage1 = client.get_metric_history(run.info.run_id, "stage1_loss")
    stage2 = client.get_metric_history(run.info.run_id, "stage2_val_accuracy")
    assert sorted(m.step for m in stage1) == [0, 1]
    assert sorted(m.step for m in stage2) == [2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/training_curves.png", "model/model.keras"} <= artifacts
    info = json.loads((tmp_path / "model" / "model_info.json").read_text())
    assert info["mlflow_run_id"] == run.info.run_id
    digest = hashlib.sha256(starting.read_bytes()).hexdigest()
    assert run.data.params["starting_weights_sha256"] == digest
    assert info["starting_weights_sha256"] == digest
    assert info["starting_weights_file"] == "start.weights.h5"


def test_warmup_cosine_rises_to_the_stage_rate_then_decays_to_the_floor():
    rates = [warmup_cosine_rate(1e-3, epoch, 8, 2) for epoch in range(8)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3)
    assert all(later < earlier for earlier, later in itertools.pairwise(rates[2:]))
    assert rates[-1] == pytest.approx(0.05e-3)
    assert warmup_cosine_rate(1e-3, 0, 1, 0) == pytest.approx(1e-3)


def test_custom_cnn_from_scratch_defaults_to_the_most_stable_bench_recipe():
    import keras

    from tumorflow.bench.recipe import RECIPES

    defaults = TrainConfig()
    assert (defaults.backbone, defaults.weights) == ("custom_cnn", "none")
    chosen = RECIPES["constant_bn0.9_recalibrated"]
    assert {key: getattr(defaults, key) for key in chosen} == chosen
    for momentum in (defaults.batchnorm_momentum, 0.6):
        _, base = build_classifier("custom_cnn", 4, 32, "none", 0.1, momentum)
        momenta = {
            layer.momentum
            for layer in base.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        }
        assert momenta == {momentum}


@pytest.mark.e2e
def test_training_applies_the_batchnorm_momentum_and_the_warmup_cosine_rates(split_dir, tmp_path):
    import keras

    config = _config(
        backbone="custom_cnn",
        stage1={"epochs": 4, "learning_rate": 1e-2},
        stage2={"epochs": 0, "learning_rate": 1e-3},
        lr_schedule="warmup_cosine",
        warmup_epochs=1,
        batchnorm_momentum=0.6,
    )
    result = train_model(split_dir, tmp_path / "model", config, tmp_path / "ckpt")
    rates = [row["learning_rate"] for row in result.history]
    assert rates[0] == pytest.approx(0.5e-2)
    assert rates[1] == pytest.approx(1e-2)
    assert rates[-1] == pytest.approx(0.05e-2)
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    momenta = {
        layer.momentum
        for layer in model.get_layer("custom_cnn").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {0.6}


@pytest.mark.e2e
def test_recalibrated_batchnorm_holds_the_plain_mean_of_the_training_batches(split_dir, tmp_path):
    import keras
    import numpy as np

    from tumorflow.components.training.input_pipeline import make_dataset

    config = _config(
        backbone="custom_cnn",
        stage1={"epochs": 2, "learning_rate": 1e-2},
        stage2={"epochs": 0, "learning_rate": 1e-3},
        batchnorm_recalibration=True,
    )
    train_model(split_dir, tmp_path / "model", config, tmp_path / "ckpt")
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    cnn = model.get_layer("custom_cnn")
    conv, norm = cnn.layers[1], cnn.layers[2]
    assert isinstance(norm, keras.layers.BatchNormalization)
    batches = make_dataset(split_dir, "train", 32, 8, None, False, 0, False)
    means = [
        np.asarray(conv(model.get_layer("preprocess")(images))).mean(axis=(0, 1, 2))
        for images, _ in batches
    ]
    np.testing.assert_allclose(np.asarray(norm.moving_mean), np.mean(means, axis=0), atol=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("keep", ["best_val_loss", "best_val_macro_f1"])
def test_the_model_keeps_the_best_epoch_over_both_stages(split_dir, tmp_path, keep):
    import keras

    from tumorflow.components.training.input_pipeline import make_dataset

    config = _config(
        backbone="custom_cnn",
        stage1={"epochs": 3, "learning_rate": 3e-2},
        stage2={"epochs": 2, "learning_rate": 1e-2},
        keep_weights=keep,
        lr_schedule="warmup_cosine",
    )
    result = train_model(split_dir, tmp_path / "model", config, tmp_path / "ckpt")
    metric = keep.removeprefix("best_")
    values = [row[metric] for row in result.history]
    best = min(values) if metric == "val_loss" else max(values)
    first = next(row for row in result.history if row[metric] == best)
    kept = result.info["kept_epoch"]
    assert (kept["stage"], kept["epoch"]) == (first["stage"], first["epoch"])
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    val = make_dataset(split_dir, "val", 32, 8, None, False, 0, False)
    loss, accuracy = model.evaluate(val, verbose=0)
    assert accuracy == pytest.approx(first["val_accuracy"], abs=1e-6)
    assert loss == pytest.approx(first["val_loss"], rel=1e-4)


@pytest.mark.e2e
def test_hostile_file_names_go_through_download_validate_and_training(tmp_path):
    from helpers import HOSTILE_NAMES, write_hostile_name_corpus

    from tumorflow.components.data.download import download_dataset
    from tumorflow.components.data.tfrecords import read_records
    from tumorflow.components.data.validate import validate_and_split
    from tumorflow.core.config import DatasetConfig, SplitConfig

    write_hostile_name_corpus(tmp_path / "src", per_class=12)
    download_dataset(str(tmp_path / "src"), tmp_path / "raw", DatasetConfig())
    split = validate_and_split(tmp_path / "raw", tmp_path / "split", SplitConfig())
    assert sum(split.summary()["images"].values()) + len(split.quarantined) == 2 * (
        12 + len(HOSTILE_NAMES)
    )
    stored = [
        record.path
        for name in ("train", "val", "test")
        for record in read_records(tmp_path / "split", name)
    ]
    assert any("~" in path for path in stored)
    config = _config(
        backbone="custom_cnn",
        stage1={"epochs": 1, "learning_rate": 1e-3},
        stage2={"epochs": 0, "learning_rate": 1e-4},
    )
    result = train_model(tmp_path / "split", tmp_path / "model", config, tmp_path / "ckpt")
    assert result.info["classes"] == ["normal", "tumor"]
    assert (tmp_path / "model" / "model.keras").stat().st_size > 0


def test_validation_metrics_are_sklearns_on_the_same_predictions():
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 50)
    probs = rng.dirichlet(np.ones(4), 50).astype(np.float32)
    probs[np.arange(25), labels[:25]] += 1.0  # half of them right, with some confidence
    probs /= probs.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)

    metrics = validation_metrics(labels, probs)

    assert metrics["val_macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert metrics["val_accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["val_loss"] == pytest.approx(log_loss(labels, probs, labels=range(4)), rel=1e-5)


class _CountedPasses:
    """A dataset stand-in that counts the passes made over it."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.dataset)


def test_one_validation_pass_gives_keras_loss_and_accuracy_and_the_macro_f1(split_dir):
    import keras
    import numpy as np

    from tumorflow.components.training.input_pipeline import make_dataset

    keras.utils.set_random_seed(2)
    model, _ = build_classifier("custom_cnn", 4, 32, "none", 0.1)
    model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    val = make_dataset(split_dir, "val", 32, 3, None, False, 0, False)
    counted = _CountedPasses(val)
    clock = EpochClock()
    validation = _validation_pass_class()(counted, clock)
    validation.set_model(model)

    logs = {"loss": 1.0}
    validation.on_epoch_end(0, logs)

    assert counted.passes == 1 and clock._row["validation"] > 0
    loss, accuracy = model.evaluate(val, verbose=0)
    assert logs["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert logs["val_accuracy"] == pytest.approx(accuracy)
    labels = np.concatenate([np.asarray(y) for _, y in val])
    expected = validation_metrics(labels, model.predict(val, verbose=0))
    assert logs["val_macro_f1"] == pytest.approx(expected["val_macro_f1"])
    assert logs["loss"] == 1.0


def _first_batchnorm_statistics(model, base, batches):
    """The plain mean over `batches` of the first BatchNormalization's input moments."""
    import numpy as np

    conv = base.layers[1]
    features = [np.asarray(conv(model.get_layer("preprocess")(images))) for images, _ in batches]
    means = np.mean([f.mean(axis=(0, 1, 2)) for f in features], axis=0)
    return means, np.mean([f.var(axis=(0, 1, 2)) for f in features], axis=0)


def test_recalibration_reads_a_bounded_sample_each_epoch_and_more_for_the_kept_weights(split_dir):
    import keras
    import numpy as np

    from tumorflow.components.training.strategy import training_distribution

    keras.utils.set_random_seed(4)
    model, base = build_classifier("custom_cnn", 4, 32, "none", 0.1, 0.9)
    # 16 training images in batches of 1: 16 batches, more than the per-epoch sample.
    per_epoch = 5
    config = _config(
        backbone="custom_cnn",
        batch_size=1,
        batchnorm_recalibration_batches=12,
        batchnorm_recalibration_epoch_batches=per_epoch,
    )
    clock = EpochClock()
    recalibration = _batchnorm_recalibration(
        config, base, split_dir, 32, 1, training_distribution(), clock
    )
    recalibration.set_model(model)
    norm = base.layers[2]
    assert isinstance(norm, keras.layers.BatchNormalization)

    recalibration.on_epoch_end(0, {})

    assert recalibration.batches_read == per_epoch
    sample = list(recalibration.sample)
    assert len(sample) == per_epoch
    means, variances = _first_batchnorm_statistics(model, base, sample)
    np.testing.assert_allclose(np.asarray(norm.moving_mean), means, atol=1e-4)
    np.testing.assert_allclose(np.asarray(norm.moving_variance), variances, rtol=1e-3)
    layers = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert {layer.momentum for layer in layers} == {0.9}
    assert set(clock._row) == {"batchnorm_recalibration"}

    # The next epoch reads the same sample again, and only it.
    norm.moving_mean.assign(np.zeros_like(means))
    recalibration.on_epoch_end(1, {})
    assert recalibration.batches_read == 2 * per_epoch
    np.testing.assert_allclose(np.asarray(norm.moving_mean), means, atol=1e-4)

    # The kept weights: `batchnorm_recalibration_batches` of the training split.
    recalibration.finish(model)
    assert recalibration.batches_read == 2 * per_epoch + 12
    all_means, _ = _first_batchnorm_statistics(model, base, recalibration.training_set)
    np.testing.assert_allclose(np.asarray(norm.moving_mean), all_means, atol=1e-4)


def test_a_sample_that_is_the_whole_bound_is_not_read_again_at_the_end(split_dir):
    from tumorflow.components.training.strategy import training_distribution

    model, base = build_classifier("custom_cnn", 4, 32, "none", 0.1, 0.9)
    config = _config(backbone="custom_cnn", batch_size=2, batchnorm_recalibration_batches=3)
    recalibration = _batchnorm_recalibration(
        config, base, split_dir, 32, 2, training_distribution(), EpochClock()
    )
    recalibration.set_model(model)
    recalibration.on_epoch_end(0, {})
    recalibration.finish(model)
    assert recalibration.batches_read == 3 and recalibration.training_set is None


def test_the_epoch_clock_times_each_addition_and_the_whole_epoch():
    clock = EpochClock()
    start = clock.callback()
    start.on_epoch_begin(0)
    start.on_epoch_end(0)
    for _ in range(2):
        with clock.phase("checkpoint"):
            pass
    row = clock.finish(1, 1)
    assert {"stage", "epoch", "train", "checkpoint", "epoch_total"} == set(row)
    assert row["epoch_total"] >= row["train"] + row["checkpoint"]
    assert clock.rows == [row]
