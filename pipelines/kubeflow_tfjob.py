"""The training step on Kubeflow with `runtime.workers > 1`: a launcher task that runs the
training component as a Kubeflow Training Operator TFJob (pipelines/tfjob_launcher.py).

Fixed when the pipeline is compiled: the number of workers, the image, the training component's
own command line and the GPU node pool's selector and toleration. Run parameters as for one
task: the accelerator count, CPU and memory of each replica.
"""

from typing import Any

from kfp.dsl import Dataset, Input, Model, Output

from tumorflow.core.config import RuntimeConfig
from tumorflow.pipelines import steps

# The Kubeflow Pipelines service account the TFJob's replicas run as: it has Workload Identity on
# the buckets (infra/terraform) and, for the launcher, the TFJob RBAC (infra/k8s/training).
TRAINING_SERVICE_ACCOUNT = "pipeline-runner"


@steps.component
def train_tfjob(
    split: Input[Dataset],
    train_config: dict,
    checkpoint_root: str,
    tracking_uri: str,
    experiment: str,
    workers: int,
    image: str,
    command: list,
    args: list,
    accelerator_count: int,
    train_cpu: str,
    train_memory: str,
    node_selector: dict,
    tolerations: list,
    service_account: str,
    model: Output[Model],
    namespace: str = "",
    api_host: str = "",
    poll_seconds: float = 30.0,
):
    """Train as a TFJob of `workers` replicas, wait for it, and take the chief's model metadata.

    `namespace` and `api_host` default to the pod's own (in-cluster service account)."""
    import json
    from pathlib import Path

    from tumorflow.pipelines.tfjob_launcher import LAUNCH_RECORD, replica_resources, train_as_tfjob

    metadata = train_as_tfjob(
        split={"uri": split.uri, "schema_title": split.schema_title, "metadata": split.metadata},
        model={"uri": model.uri, "schema_title": model.schema_title, "metadata": {}},
        parameters={
            "train_config": train_config,
            "checkpoint_root": checkpoint_root,
            "tracking_uri": tracking_uri,
            "experiment": experiment,
        },
        workers=workers,
        image=image,
        command=command,
        args=args,
        resources=replica_resources(train_cpu, train_memory, accelerator_count),
        node_selector=node_selector,
        tolerations=tolerations,
        service_account=service_account,
        namespace=namespace,
        api_host=api_host,
        poll_seconds=poll_seconds,
    )
    model.metadata.update(metadata)
    # The chief wrote the model beside this; the launcher's own output records which job did.
    Path(model.path).mkdir(parents=True, exist_ok=True)
    (Path(model.path) / LAUNCH_RECORD).write_text(json.dumps({"tfjob": metadata["tfjob"]}))


def tfjob_train_task(
    component: Any,
    runtime: RuntimeConfig,
    p: dict[str, Any],
    node_selector: dict[str, str],
    tolerations: list[dict[str, str]],
    **inputs: Any,
) -> Any:
    """The launcher task running `component` (the training step) as a TFJob for `runtime`."""
    container = component.component_spec.implementation.container
    return steps.in_image(train_tfjob, runtime.image)(
        **inputs,
        workers=runtime.workers,
        image=container.image,
        command=list(container.command),
        args=list(container.args),
        accelerator_count=p["accelerator_count"],
        train_cpu=p["train_cpu"],
        train_memory=p["train_memory"],
        node_selector=node_selector,
        tolerations=tolerations,
        service_account=TRAINING_SERVICE_ACCOUNT,
    ).set_retry(num_retries=2)
