"""Multi-worker training on Kubeflow: a Kubeflow Training Operator `TFJob` (kubeflow.org/v1).

There is no KFP v2 component for a TFJob, so the pipeline's training step launches one: it
creates the TFJob through the Kubernetes API (the pod's service account, RBAC in
infra/k8s/training), waits for its `Succeeded` or `Failed` condition, and deletes it whatever
happened. The job has one `Chief` and `workers - 1` `Worker` replicas of the project image, each
running the training component's own command with an executor input naming the step's artifacts
(pipelines/executor_io.py)
(so each replica is the same training step, as on Vertex AI); the operator sets `TF_CONFIG` on
each, and training picks MultiWorkerMirroredStrategy from it (components/training/strategy.py). The
replicas reach the artifacts where the KFP launcher does, `/gcs/BUCKET/...`, through GKE's Cloud
Storage FUSE CSI driver. Only the chief writes the step's executor output; the launcher copies the
model's metadata from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tumorflow.core import storage
from tumorflow.core.errors import ConfigError, TumorflowError
from tumorflow.pipelines import executor_io

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "tfjobs"
# The Training Operator injects TF_CONFIG and the port into the container of this name only.
CONTAINER_NAME = "tensorflow"
NAME_PREFIX = "tumorflow-train-"
# Where the KFP launcher and Vertex AI mount gs://BUCKET; the replicas mount it there too.
GCS_MOUNT = "/gcs/"
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# What the launcher leaves in its own model output: which job made the model.
LAUNCH_RECORD = "tfjob.json"
_CHIEF_OUTPUT = "tfjob_executor_output.json"


class TFJobFailed(TumorflowError):
    """The training TFJob failed, timed out or could not be created."""


def _bucket_of(uri: str) -> str:
    if uri.startswith(GCS_MOUNT):
        return uri[len(GCS_MOUNT) :].split("/", 1)[0]
    if uri.startswith("gs://"):
        return storage.split_uri(uri)[0]
    raise ConfigError(
        f"training as a TFJob needs its artifacts and checkpoints in Cloud Storage (a gs:// "
        f"pipeline root, checkpoint_root under /gcs/BUCKET), not {uri!r}: the replicas mount "
        "the bucket at /gcs/BUCKET"
    )


def _local_path(uri: str) -> str:
    """Where a replica sees `uri`: gs://B/x is /gcs/B/x, as the KFP launcher maps it."""
    return GCS_MOUNT + uri[len("gs://") :] if uri.startswith("gs://") else uri


def tfjob_manifest(
    *,
    workers: int,
    image: str,
    command: list[str],
    args: list[str],
    executor_input: dict[str, Any],
    buckets: list[str],
    resources: Mapping[str, Any],
    node_selector: Mapping[str, str] | None = None,
    tolerations: list[Mapping[str, Any]] | None = None,
    service_account: str = "",
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The TFJob body: a Chief and `workers - 1` Workers of `image` running `command` + `args`
    (the `{{$}}` placeholder replaced by `executor_input`), with `resources` (limits), the GPU
    node pool's selector and tolerations, and each bucket mounted at /gcs/BUCKET.

    A Worker writes its executor output to a scratch file: only the chief's counts."""
    if workers < 2:
        raise ConfigError(f"a multi-worker TFJob needs runtime.workers >= 2, not {workers}")
    mounts = [
        {"name": f"gcs-{index}", "mountPath": f"{GCS_MOUNT}{bucket}"}
        for index, bucket in enumerate(buckets)
    ]
    volumes = [
        {
            "name": f"gcs-{index}",
            "csi": {
                "driver": GCSFUSE_DRIVER,
                "volumeAttributes": {"bucketName": bucket, "mountOptions": "implicit-dirs"},
            },
        }
        for index, bucket in enumerate(buckets)
    ]

    def replica(count: int, output_file: str) -> dict[str, Any]:
        replica_input = executor_io.with_output_file(executor_input, output_file)
        container = {
            "name": CONTAINER_NAME,
            "image": image,
            "command": list(command),
            "args": executor_io.args_with_input(args, replica_input),
            "resources": {"limits": dict(resources)},
            "volumeMounts": mounts,
        }
        pod: dict[str, Any] = {"containers": [container], "volumes": volumes}
        if service_account:
            pod["serviceAccountName"] = service_account
        if node_selector:
            pod["nodeSelector"] = dict(node_selector)
        if tolerations:
            pod["tolerations"] = [dict(toleration) for toleration in tolerations]
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                # The Cloud Storage FUSE CSI driver injects its sidecar into annotated pods.
                "metadata": {"annotations": {"gke-gcsfuse/volumes": "true"}},
                "spec": pod,
            },
        }

    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TFJob",
        "metadata": {"generateName": NAME_PREFIX, "labels": dict(labels or {})},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 2},
            "tfReplicaSpecs": {
                "Chief": replica(1, executor_input["outputs"]["outputFile"]),
                "Worker": replica(workers - 1, "/tmp/tumorflow-worker-executor-output.json"),
            },
        },
    }


def replica_resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    """A replica's resource limits: the training task's CPU, memory and NVIDIA GPUs."""
    return {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": gpus} if gpus else {})


def kubernetes_client(host: str = "") -> Any:
    """A Kubernetes API client: the pod's own service account in the cluster, or `host` (an API
    server such as `kubectl proxy`'s, without authentication)."""
    from kubernetes import client, config

    if not host:
        config.load_incluster_config()
        return client.ApiClient()
    configuration = client.Configuration()
    configuration.host = host
    return client.ApiClient(configuration)


def current_namespace() -> str:
    """The namespace this pod runs in (the launcher creates its TFJob there)."""
    path = SERVICE_ACCOUNT_DIR / "namespace"
    if not path.exists():
        raise ConfigError(f"not running in a Kubernetes pod ({path} is missing): name a namespace")
    return path.read_text().strip()


def _condition(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The TFJob's final condition (Succeeded or Failed), or None while it runs."""
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_tfjob(
    manifest: dict[str, Any],
    *,
    namespace: str,
    api_client: Any,
    poll_seconds: float = 30.0,
    timeout_seconds: float = 48 * 3600,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Create the TFJob, wait until it succeeds (return its name) or fails (raise TFJobFailed with
    the operator's reason), and delete it in either case."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(api_client)
    try:
        created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except ApiException as error:
        raise TFJobFailed(
            f"could not create the training TFJob in namespace {namespace}: {error.status} "
            f"{error.reason} (is the Kubeflow Training Operator installed, and infra/k8s/training "
            "applied?)"
        ) from None
    name = created["metadata"]["name"]
    log.info("training as TFJob %s/%s", namespace, name)
    deadline = time.monotonic() + timeout_seconds
    try:
        while True:
            job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            final = _condition(job.get("status") or {})
            if final is not None and final["type"] == "Succeeded":
                return name
            if final is not None:
                raise TFJobFailed(
                    f"training TFJob {namespace}/{name} failed: "
                    f"{_one_line(final.get('reason', ''))}: {_one_line(final.get('message', ''))}"
                )
            if time.monotonic() >= deadline:
                raise TFJobFailed(
                    f"training TFJob {namespace}/{name} did not finish within "
                    f"{timeout_seconds:.0f} s"
                )
            sleep(poll_seconds)
    finally:
        try:
            api.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as error:
            if error.status != 404:
                log.warning("could not delete TFJob %s/%s: %s", namespace, name, error.reason)


def train_as_tfjob(
    *,
    split: Mapping[str, Any],
    model: Mapping[str, Any],
    parameters: Mapping[str, Any],
    workers: int,
    image: str,
    command: list[str],
    args: list[str],
    resources: Mapping[str, Any],
    node_selector: Mapping[str, str] | None = None,
    tolerations: list[Mapping[str, Any]] | None = None,
    service_account: str = "",
    namespace: str = "",
    api_host: str = "",
    poll_seconds: float = 30.0,
    timeout_seconds: float = 48 * 3600,
) -> dict[str, Any]:
    """Run the training step as a TFJob (module docstring) and return the model's metadata as the
    chief wrote it. `split` and `model`: the step's artifacts (`uri`, `schema_title`,
    `metadata`); `parameters`: the training component's parameter values."""
    model_uri = model["uri"]
    chief_output = storage.join(model_uri.rsplit("/", 1)[0], _CHIEF_OUTPUT)
    buckets = sorted(
        {_bucket_of(uri) for uri in (split["uri"], model_uri, parameters["checkpoint_root"])}
    )
    executor_input = executor_io.executor_input(
        parameters, {"split": split}, {"model": model}, _local_path(chief_output)
    )
    manifest = tfjob_manifest(
        workers=workers,
        image=image,
        command=command,
        args=args,
        executor_input=executor_input,
        buckets=buckets,
        resources=resources,
        node_selector=node_selector,
        tolerations=tolerations,
        service_account=service_account,
        labels={"app.kubernetes.io/part-of": "tumorflow"},
    )
    name = run_tfjob(
        manifest,
        namespace=namespace or current_namespace(),
        api_client=kubernetes_client(api_host),
        poll_seconds=poll_seconds,
        timeout_seconds=timeout_seconds,
    )
    written, _ = storage.read_versioned(chief_output)
    if written is None:
        raise TFJobFailed(f"training TFJob {name} succeeded but its chief wrote no {chief_output}")
    return {**executor_io.output_artifact_metadata(written, "model"), "tfjob": name}
