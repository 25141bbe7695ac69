"""Which `tf.distribute` strategy training runs under, and what scales with its replicas.

- Several workers named by `TF_CONFIG` (a Kubeflow Training Operator TFJob, or Vertex AI, which
  sets it too) or by Vertex AI's `CLUSTER_SPEC`: `MultiWorkerMirroredStrategy`, one replica per
  device of every worker, gradients all-reduced across them.
- One worker with several GPUs: `MirroredStrategy` over all visible GPUs.
- Otherwise the default strategy (one device: today's training, unchanged).

The scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): `train.batch_size` is the
batch of ONE replica, so the global batch is `batch_size × replicas`, and every stage's learning
rate is multiplied by the same factor (linear scaling), so an epoch makes the same progress with
fewer, larger steps. One replica: nothing changes.

Checkpoints: the chief (worker 0) writes them; every worker restores from the same folder (a
shared mount such as /gcs/BUCKET). The other workers save theirs, and their model outputs, to
scratch folders, so the step's outputs are the chief's.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorflow.components.training.checkpoints import CheckpointStore
from tumorflow.core.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

MIRRORED = "mirrored"
MULTI_WORKER = "multi_worker_mirrored"
DEFAULT = "default"


@dataclass(frozen=True)
class ClusterSpec:
    """The workers of a training job and which of them this process is."""

    workers: tuple[str, ...]
    task_index: int
    tf_config: dict[str, Any]

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        return self.task_index == 0


def _from_tf_config(raw: str) -> ClusterSpec:
    config = json.loads(raw)
    cluster = config.get("cluster", {})
    task = config.get("task", {})
    # A TFJob may name a separate chief; it counts as worker 0 then.
    workers = (*cluster.get("chief", []), *cluster.get("worker", []))
    index = int(task.get("index", 0))
    if task.get("type") == "worker" and cluster.get("chief"):
        index += len(cluster["chief"])
    return ClusterSpec(tuple(workers), index, config)


def _from_vertex_cluster_spec(raw: str) -> ClusterSpec:
    """Vertex AI's CLUSTER_SPEC: worker pools `workerpool0` (the chief), `workerpool1`, ..."""
    spec = json.loads(raw)
    cluster = spec.get("cluster", {})
    pools = sorted(name for name in cluster if name.startswith("workerpool"))
    workers: list[str] = []
    offsets: dict[str, int] = {}
    for name in pools:
        offsets[name] = len(workers)
        workers.extend(cluster[name])
    task = spec.get("task", {})
    index = offsets.get(task.get("type", "workerpool0"), 0) + int(task.get("index", 0))
    tf_config = {
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": index},
    }
    return ClusterSpec(tuple(workers), index, tf_config)


def cluster_from_environment(environ: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """The multi-worker cluster the job's environment describes, or None for a single worker.

    `TF_CONFIG` wins over `CLUSTER_SPEC` (Vertex AI sets both for TensorFlow jobs).
    """
    environ = os.environ if environ is None else environ
    try:
        if environ.get("TF_CONFIG"):
            spec = _from_tf_config(environ["TF_CONFIG"])
        elif environ.get("CLUSTER_SPEC"):
            spec = _from_vertex_cluster_spec(environ["CLUSTER_SPEC"])
        else:
            return None
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(
            f"TF_CONFIG / CLUSTER_SPEC is not a valid cluster spec: {error}"
        ) from None
    if spec.num_workers <= 1:
        return None
    if not 0 <= spec.task_index < spec.num_workers:
        raise ConfigError(
            f"the cluster spec names {spec.num_workers} workers but this task is {spec.task_index}"
        )
    return spec


def scaled_batch_and_rate(
    per_replica_batch: int, learning_rate: float, replicas: int
) -> tuple[int, float]:
    """The linear scaling rule: global batch and learning rate for `replicas` replicas."""
    return per_replica_batch * replicas, learning_rate * replicas


class _WorkerCheckpointStore(CheckpointStore):
    """A non-chief worker's checkpoints: restored from the shared folder the chief writes, saved
    to a scratch folder of its own. Every worker saves, as TensorFlow asks: a save can run
    collective ops that all workers must join."""

    def __init__(self, shared: CheckpointStore, scratch: Path) -> None:
        super().__init__(scratch, shared.fingerprint)
        self.shared = shared

    def latest(self) -> dict[str, Any] | None:
        return self.shared.latest()


@dataclass
class TrainingDistribution:
    """The strategy training builds its model under, and what follows from it."""

    strategy: tf.distribute.Strategy
    kind: str
    cluster: ClusterSpec | None = None

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def is_chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    def global_batch(self, per_replica_batch: int) -> int:
        return scaled_batch_and_rate(per_replica_batch, 0.0, self.replicas)[0]

    def learning_rate(self, learning_rate: float) -> float:
        return scaled_batch_and_rate(1, learning_rate, self.replicas)[1]

    def checkpoint_store(self, store: CheckpointStore) -> CheckpointStore:
        """The store itself on the chief; elsewhere one that restores from it (see above)."""
        if self.is_chief:
            return store
        return _WorkerCheckpointStore(store, self._scratch("checkpoints"))

    def output_dir(self, output_dir: Path) -> Path:
        """Where this worker writes the model folder: the step's output on the chief only."""
        return output_dir if self.is_chief else self._scratch("model")

    def _scratch(self, what: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"tumorflow-worker{self.cluster.task_index}-{what}-"))

    def shard(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """Each worker reads its own share of the examples (DATA sharding: the split's few
        TFRecord files are not enough to give every worker whole files)."""
        import tensorflow as tf

        if self.cluster is None:
            return dataset
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return dataset.with_options(options)


def _multi_worker_strategy_class() -> type:
    import tensorflow as tf

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3's `fit` gives it: a nest
        of values (the first batch, reduced in one call to build the model) and scalar logs
        reduced over `axis=0` (the metrics are already global: mirrored variables summed over
        all replicas). The collective strategy's own `reduce` refuses both."""

        def reduce(self, reduce_op: Any, value: Any, axis: Any) -> Any:
            parent = super()

            def reduce_one(item: Any) -> Any:
                local = self.experimental_local_results(item)[0]
                scalar = getattr(local, "shape", None) is not None and local.shape.rank == 0
                return parent.reduce(reduce_op, item, None if scalar else axis)

            return tf.nest.map_structure(reduce_one, value)

    return MultiWorkerMirroredStrategy


def training_distribution(environ: Mapping[str, str] | None = None) -> TrainingDistribution:
    """Pick the strategy from the job's cluster spec and the visible GPUs (module docstring)."""
    import tensorflow as tf

    cluster = cluster_from_environment(environ)
    if cluster is not None:
        # From the parsed spec, so a Vertex CLUSTER_SPEC works as TF_CONFIG does.
        task = cluster.tf_config.get("task", {})
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster.tf_config["cluster"]),
            task_type=task.get("type", "worker"),
            task_id=int(task.get("index", 0)),
            rpc_layer="grpc",
        )
        strategy = _multi_worker_strategy_class()(cluster_resolver=resolver)
        kind = MULTI_WORKER
    else:
        gpus = tf.config.list_logical_devices("GPU")
        cpus = tf.config.list_logical_devices("CPU")
        devices = gpus if len(gpus) > 1 else cpus if not gpus and len(cpus) > 1 else []
        if devices:
            strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
            kind = MIRRORED
        else:
            strategy = tf.distribute.get_strategy()
            kind = DEFAULT
    distribution = TrainingDistribution(strategy, kind, cluster)
    log.info(
        "training with %s strategy: %d replica(s)%s",
        kind,
        distribution.replicas,
        f", worker {cluster.task_index} of {cluster.num_workers}" if cluster else "",
    )
    return distribution
