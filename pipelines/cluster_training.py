"""How the training task runs on a cluster: one GPU task, or a multi-worker job on Vertex AI or
Kubeflow.

`runtime.workers == 1`: today's single task with its accelerator, CPU and memory limits; with
`runtime.gke_gpu_pool`, plus the GKE GPU node pool's node selector and toleration (kfp-kubernetes)
so Kubeflow schedules it there (the compiled YAML then holds a second, platform document).
`runtime.workers > 1`, by `runtime.target`:
- `vertex`: the same component run as a Vertex AI custom training job
  (google-cloud-pipeline-components) with worker pools: worker pool 0 the chief, pool 1 the other
  `workers - 1` replicas, each with `machine_type` and its accelerators; Vertex sets TF_CONFIG /
  CLUSTER_SPEC on each.
- `kubeflow`: a launcher task that runs the same component as a Kubeflow Training Operator TFJob
  (pipelines/kubeflow_tfjob.py): one Chief and `workers - 1` Workers, each with the task's accelerators,
  CPU and memory and, with `gke_gpu_pool`, the GPU pool's node selector and toleration; the
  operator sets TF_CONFIG.
Either way training picks MultiWorkerMirroredStrategy from it (components/training/strategy.py).
"""

from __future__ import annotations

from typing import Any

from tumorflow.core.config import RuntimeConfig

# GKE labels GPU nodes with their accelerator and taints them so only GPU pods land there
# (infra/terraform's GPU pool sets the same).
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TAINT_VALUE = "present"


# The runtime fields fixed when a pipeline is compiled (traced): the image every step runs in and
# how training is laid out. They are not run parameters (pipelines/pipeline.py).
COMPILED_FIELDS = frozenset(
    {
        "image",
        "target",
        "workers",
        "machine_type",
        "gke_gpu_pool",
        "trust_root_secret",
        "pipeline_key_secret",
    }
)
# The runtime fields a trace depends on: those, and the accelerator type, which a Vertex job's
# worker pools and the GKE GPU label fix at compile time although one task takes it per run.
LAYOUT_FIELDS = COMPILED_FIELDS | {"accelerator_type"}


def same_layout(a: RuntimeConfig, b: RuntimeConfig) -> bool:
    """Whether two runtime sections lay the training task out the same way."""
    return a.model_dump(include=LAYOUT_FIELDS) == b.model_dump(include=LAYOUT_FIELDS)


def gke_accelerator(accelerator_type: str) -> str:
    """The GKE node label value of a Vertex AI accelerator name: NVIDIA_L4 -> nvidia-l4."""
    return accelerator_type.lower().replace("_", "-")


def gpu_pool_placement(runtime: RuntimeConfig) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The GKE GPU node pool's node selector and tolerations for `runtime` (none without
    `gke_gpu_pool` or without accelerators)."""
    if not (runtime.gke_gpu_pool and runtime.accelerator_count):
        return {}, []
    return (
        {GKE_ACCELERATOR_LABEL: gke_accelerator(runtime.accelerator_type)},
        [
            {
                "key": GPU_TAINT_KEY,
                "operator": "Equal",
                "value": GPU_TAINT_VALUE,
                "effect": "NoSchedule",
            }
        ],
    )


def train_task(component: Any, runtime: RuntimeConfig, p: dict[str, Any], **inputs: Any) -> Any:
    """The pipeline's training task for `runtime` (module docstring); `p` the run parameters."""
    node_selector, tolerations = gpu_pool_placement(runtime)
    if runtime.workers > 1 and runtime.target == "kubeflow":
        from tumorflow.pipelines.kubeflow_tfjob import tfjob_train_task

        return tfjob_train_task(component, runtime, p, node_selector, tolerations, **inputs)
    if runtime.workers > 1:
        from google_cloud_pipeline_components.v1.custom_job import (
            create_custom_training_job_from_component,
        )

        job = create_custom_training_job_from_component(
            component,
            display_name="tumorflow-train",
            replica_count=runtime.workers,
            machine_type=runtime.machine_type,
            accelerator_type=runtime.accelerator_type if runtime.accelerator_count else "",
            accelerator_count=runtime.accelerator_count,
            restart_job_on_worker_restart=True,
        )
        return job(**inputs).set_retry(num_retries=2)

    from kfp import kubernetes

    task = (
        component(**inputs)
        .set_accelerator_type(p["accelerator_type"])
        .set_accelerator_limit(p["accelerator_count"])
        .set_cpu_limit(p["train_cpu"])
        .set_memory_limit(p["train_memory"])
        .set_retry(num_retries=2)
    )
    for key, value in node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for toleration in tolerations:
        kubernetes.add_toleration(task, **toleration)
    return task
