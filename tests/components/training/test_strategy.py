"""Distributed training: the strategy a job's environment picks, the scaling rule, and real
training on two logical CPU devices (MirroredStrategy) and on two loopback workers
(MultiWorkerMirroredStrategy), each killed after a checkpoint and resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import SLOW_TRAINING_CHILD, free_port, wait_until, write_synthetic_split

from tumorflow.components.training.checkpoints import LATEST
from tumorflow.components.training.strategy import cluster_from_environment, scaled_batch_and_rate
from tumorflow.core.config import TrainConfig
from tumorflow.core.errors import ConfigError


def test_tf_config_of_a_tfjob_names_the_workers_and_the_chief():
    tf_config = {
        "cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    spec = cluster_from_environment({"TF_CONFIG": json.dumps(tf_config)})
    assert spec.num_workers == 3 and spec.task_index == 2 and not spec.is_chief
    chief = cluster_from_environment(
        {"TF_CONFIG": json.dumps({**tf_config, "task": {"type": "chief", "index": 0}})}
    )
    assert chief.is_chief


def test_vertex_cluster_spec_becomes_a_worker_list_with_workerpool0_as_chief():
    cluster_spec = {
        "cluster": {"workerpool0": ["a:2222"], "workerpool1": ["b:2222", "c:2222"]},
        "task": {"type": "workerpool1", "index": 0},
    }
    spec = cluster_from_environment({"CLUSTER_SPEC": json.dumps(cluster_spec)})
    assert spec.workers == ("a:2222", "b:2222", "c:2222")
    assert spec.task_index == 1 and not spec.is_chief
    assert spec.tf_config == {
        "cluster": {"worker": ["a:2222", "b:2222", "c:2222"]},
        "task": {"type": "worker", "index": 1},
    }


def test_one_worker_or_no_spec_is_single_worker_training():
    one = {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}
    assert cluster_from_environment({"TF_CONFIG": json.dumps(one)}) is None
    assert cluster_from_environment({}) is None


def test_a_broken_cluster_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        cluster_from_environment({"TF_CONFIG": "{not json"})
    two = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 5}}
    with pytest.raises(ConfigError, match="2 workers"):
        cluster_from_environment({"TF_CONFIG": json.dumps(two)})


def test_batch_and_learning_rate_scale_linearly_with_replicas():
    assert scaled_batch_and_rate(16, 1e-3, 1) == (16, 1e-3)
    batch, rate = scaled_batch_and_rate(16, 1e-3, 4)
    assert batch == 64 and rate == pytest.approx(4e-3)


_CHILD = (
    """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO)
import tensorflow as tf
devices = int(sys.argv[5])
if devices > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * devices
    )
"""
    + SLOW_TRAINING_CHILD
    + """print("RESULT " + json.dumps(result.summary()), flush=True)
"""
)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return write_synthetic_split(
        tmp_path_factory.mktemp("split"), {"train": 40, "val": 8}, size=32, seed=7
    )


def _config() -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "backbone": "custom_cnn",
            "image_size": 32,
            "batch_size": 8,
            "stage1": {"epochs": 4, "learning_rate": 2e-3},
            "stage2": {"epochs": 1, "learning_rate": 5e-4},
            "use_class_weights": False,
        }
    )


def _train(split_dir: Path, workdir: Path, pause: float, devices: int = 1, tf_config=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    script = textwrap.dedent(_CHILD)
    args = [str(split_dir), str(workdir), _config().model_dump_json(), str(pause), str(devices)]
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _finish(child: subprocess.Popen) -> tuple[str, dict]:
    output = child.communicate(timeout=600)[0]
    assert child.returncode == 0, output
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    return output, json.loads(line.removeprefix("RESULT "))


def _kill_after_first_checkpoint(children: list[subprocess.Popen], ckpt: Path) -> None:
    def checkpointed() -> bool:
        for child in children:
            assert child.poll() is None, child.communicate()[0]
        return (ckpt / LATEST).exists()

    wait_until(checkpointed, 300, "the first epoch's checkpoint")
    for child in children:
        child.send_signal(signal.SIGKILL)
        child.communicate()


@pytest.fixture(scope="module")
def one_device_accuracy(split_dir, tmp_path_factory) -> float:
    _, result = _finish(_train(split_dir, tmp_path_factory.mktemp("one"), pause=0))
    return result["best_val_accuracy"]


ACCURACY_BAND = 0.25


@pytest.mark.e2e
def test_mirrored_on_two_devices_resumes_after_a_kill_and_learns_as_one_device(
    split_dir, tmp_path, one_device_accuracy
):
    _kill_after_first_checkpoint([_train(split_dir, tmp_path, 60, devices=2)], tmp_path / "ckpt")
    assert not (tmp_path / "model" / "model.keras").exists()

    output, result = _finish(_train(split_dir, tmp_path, 0, devices=2))
    assert "mirrored strategy: 2 replica(s)" in output
    assert "resuming from stage 1 epoch 1" in output
    assert "Epoch 1/4" not in output and "Epoch 4/4" in output
    # a per-replica batch of 8 on 2 replicas: the 160 training images are 10 steps an epoch, not 20
    assert re.search(r"^10/10 ", output, re.MULTILINE)
    info = json.loads((tmp_path / "model" / "model_info.json").read_text())
    assert info["epochs_run"] == {"stage1": 4, "stage2": 1}
    assert result["best_val_accuracy"] > 0.4
    assert abs(result["best_val_accuracy"] - one_device_accuracy) <= ACCURACY_BAND


@pytest.mark.e2e
def test_two_workers_on_loopback_resume_after_a_kill_and_only_the_chief_writes(
    split_dir, tmp_path, one_device_accuracy
):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]

    def start(pause: float) -> list[subprocess.Popen]:
        return [
            _train(
                split_dir,
                tmp_path,
                pause,
                tf_config={"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}},
            )
            for i in range(2)
        ]

    _kill_after_first_checkpoint(start(60), tmp_path / "ckpt")
    outputs = [_finish(child) for child in start(0)]
    for output, _ in outputs:
        assert "multi_worker_mirrored strategy: 2 replica(s)" in output
        assert "resuming from stage 1 epoch 1" in output
        assert "Epoch 1/4" not in output and "Epoch 4/4" in output
    chief, other = (result for _, result in outputs)
    assert chief["best_val_accuracy"] == pytest.approx(other["best_val_accuracy"])
    assert abs(chief["best_val_accuracy"] - one_device_accuracy) <= ACCURACY_BAND
    assert (tmp_path / "model" / "model.keras").exists()
    assert len(list((tmp_path / "ckpt").glob("ckpt-*"))) == 1
