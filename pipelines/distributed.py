"""The training task on a cluster: one GPU task, or a multi-worker Vertex AI custom job.

`runtime.workers == 1`: today's single task with its accelerator, CPU and memory limits; with
`runtime.gke_gpu_pool`, plus the GKE GPU node pool's node selector and toleration (kfp-kubernetes)
so Kubeflow schedules it there (the compiled YAML then holds a second, platform document).
`runtime.workers > 1`: the same component run as a Vertex AI custom training job
(google-cloud-pipeline-components) with worker pools: worker pool 0 the chief, pool 1 the other
`workers - 1` replicas, each with `machine_type` and its accelerators; Vertex sets TF_CONFIG /
CLUSTER_SPEC on each and training picks MultiWorkerMirroredStrategy (components/distribute.py).
"""

from __future__ import annotations

from typing import Any

from tumorflow.core.config import RuntimeConfig

# GKE labels GPU nodes with their accelerator and taints them so only GPU pods land there
# (infra/terraform's GPU pool sets the same).
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TAINT_VALUE = "present"


# The runtime fields that shape the training task (the others are run parameters).
LAYOUT_FIELDS = frozenset({"workers", "machine_type", "gke_gpu_pool", "accelerator_type"})


def same_layout(a: RuntimeConfig, b: RuntimeConfig) -> bool:
    """Whether two runtime sections lay the training task out the same way."""
    return a.model_dump(include=LAYOUT_FIELDS) == b.model_dump(include=LAYOUT_FIELDS)


def gke_accelerator(accelerator_type: str) -> str:
    """The GKE node label value of a Vertex AI accelerator name: NVIDIA_L4 -> nvidia-l4."""
    return accelerator_type.lower().replace("_", "-")


def train_task(component: Any, runtime: RuntimeConfig, p: dict[str, Any], **inputs: Any) -> Any:
    """The pipeline's training task for `runtime` (module docstring); `p` the run parameters."""
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
    if runtime.gke_gpu_pool and runtime.accelerator_count:
        kubernetes.add_node_selector(
            task, GKE_ACCELERATOR_LABEL, gke_accelerator(runtime.accelerator_type)
        )
        kubernetes.add_toleration(
            task, key=GPU_TAINT_KEY, operator="Equal", value=GPU_TAINT_VALUE, effect="NoSchedule"
        )
    return task
