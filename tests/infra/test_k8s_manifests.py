"""The kustomize manifests of infra/k8s render (base and gpu overlay) into valid Kubernetes objects.

kustomize is not installed here, so the test renders with a small implementation of the
kustomize features the manifests use (resources, patches as strategic merge, images, labels),
itself tested below, and checks every object against the Kubernetes API models of the official
`kubernetes` client: an unknown or misspelt field makes the round trip differ.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from tumorflow.core import serving_layout
from tumorflow.core.config import DeployConfig, PipelineConfig

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
MODELS = {
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "ConfigMap": "V1ConfigMap",
    "ServiceAccount": "V1ServiceAccount",
    "Namespace": "V1Namespace",
    "NetworkPolicy": "V1NetworkPolicy",
    "StatefulSet": "V1StatefulSet",
}


def strategic_merge(target: dict, patch: dict) -> None:
    """Kubernetes strategic merge for the fields used here: maps merge, named lists merge by name."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            strategic_merge(current, value)
        elif (
            isinstance(value, list)
            and isinstance(current, list)
            and all(isinstance(item, dict) and "name" in item for item in value + current)
        ):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    strategic_merge(by_name[item["name"]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def _containers(document: dict) -> list[dict]:
    return document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def render(directory: Path) -> list[dict]:
    """`kustomize build directory` for resources, patches, images and labels."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {
        "apiVersion",
        "kind",
        "resources",
        "patches",
        "images",
        "labels",
        "namespace",
    }
    assert not unsupported, f"the test renderer does not implement {unsupported}"
    documents: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            documents += render(path)
        else:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch.get("target", {"kind": body["kind"], "name": body["metadata"]["name"]})
        matches = [
            doc
            for doc in documents
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]
        ]
        assert matches, f"patch {patch['path']} matches no resource"
        for doc in matches:
            strategic_merge(doc, body)
    for image in kustomization.get("images", []):
        for doc in documents:
            for container in _containers(doc):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if namespace := kustomization.get("namespace"):
        for doc in documents:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = namespace
    for labels in kustomization.get("labels", []):
        pairs = labels["pairs"]
        for doc in documents:
            doc["metadata"].setdefault("labels", {}).update(pairs)
            if not labels.get("includeSelectors"):
                continue
            spec = doc.get("spec", {})
            if doc["kind"] == "Deployment":
                spec["selector"].setdefault("matchLabels", {}).update(pairs)
                spec["template"]["metadata"].setdefault("labels", {}).update(pairs)
            elif doc["kind"] == "Service":
                spec.setdefault("selector", {}).update(pairs)
    return documents


def to_model(document: dict) -> Any:
    """Deserialize into the client's model and check that nothing was lost on the way back."""
    client = ApiClient()
    model = client._ApiClient__deserialize(copy.deepcopy(document), MODELS[document["kind"]])
    assert client.sanitize_for_serialization(model) == document, (
        f"{document['kind']} has unknown fields"
    )
    return model


def by_name(documents: list[dict]) -> dict[str, Any]:
    """Every object as the client's model, keyed `Kind/name`."""
    keys = [f"{doc['kind']}/{doc['metadata']['name']}" for doc in documents]
    assert len(keys) == len(set(keys)), keys
    return {key: to_model(doc) for key, doc in zip(keys, documents, strict=True)}


def one(objects: dict[str, Any], kind: str) -> Any:
    (found,) = [model for key, model in objects.items() if key.startswith(f"{kind}/")]
    return found


def effective_args(container: Any, config_maps: dict[str, Any]) -> dict[str, str]:
    """The container's `--flag=value` args as the kubelet passes them: `$(VAR)` expanded from
    the container's env, itself read from ConfigMaps."""
    env = {}
    for var in container.env or []:
        if var.value_from is not None:
            ref = var.value_from.config_map_key_ref
            env[var.name] = config_maps[f"ConfigMap/{ref.name}"].data[ref.key]
        else:
            env[var.name] = var.value
    args = {}
    for arg in container.args:
        flag, value = arg.removeprefix("--").split("=", 1)
        args[flag] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
    return args


def test_renderer_merges_named_lists_and_replaces_the_rest(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [deploy.yaml]\n")
    (tmp_path / "base" / "deploy.yaml").write_text(
        "kind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {}\n  template:\n    metadata: {}\n"
        "    spec:\n      tolerations: [{key: a}]\n      containers:\n"
        "        - {name: c, image: 'img:1', args: [--x], resources: {limits: {cpu: '1'}}}\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [base]\npatches: [{path: p.yaml}]\nimages: [{name: img, newTag: '2-gpu'}]\n"
        "labels: [{pairs: {app: t}, includeSelectors: true}]\n"
    )
    (tmp_path / "p.yaml").write_text(
        "kind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n"
        "      tolerations: [{key: b}]\n      containers:\n"
        "        - {name: c, resources: {limits: {gpu: 1}}}\n        - {name: side, image: s}\n"
    )
    (doc,) = render(tmp_path)
    containers = _containers(doc)
    assert containers[0] == {
        "name": "c",
        "image": "img:2-gpu",
        "args": ["--x"],
        "resources": {"limits": {"cpu": "1", "gpu": 1}},
    }
    assert [c["name"] for c in containers] == ["c", "side"]
    assert doc["spec"]["template"]["spec"]["tolerations"] == [{"key": "b"}]
    assert (
        doc["spec"]["selector"]["matchLabels"]
        == {"app": "t"}
        == doc["spec"]["template"]["metadata"]["labels"]
    )


def test_model_check_refuses_a_misspelt_field() -> None:
    with pytest.raises(AssertionError, match="unknown fields"):
        to_model(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "s"},
                "spec": {"prots": []},
            }
        )


def _container_port(container: Any, name: str) -> int:
    return next(p.container_port for p in container.ports if p.name == name)


def test_base_serves_tf_serving_from_gcs_with_probes_and_limits() -> None:
    objects = by_name(render(K8S / "base"))
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    pod = deployment.spec.template.spec
    (container,) = pod.containers
    assert container.image == "tensorflow/serving:2.19.0"
    assert _container_port(container, "grpc") == 8500 and _container_port(container, "http") == 8501
    args = effective_args(container, objects)
    (volume,) = [v for v in pod.volumes if v.config_map]
    server_files = objects[f"ConfigMap/{volume.config_map.name}"]
    mount = next(m.mount_path for m in container.volume_mounts if m.name == volume.name)
    for flag in ("monitoring_config_file", "batching_parameters_file"):
        directory, key = args[flag].rsplit("/", 1)
        assert directory == mount and key in server_files.data, flag
    probe = container.readiness_probe.http_get
    assert probe.path == f"/v1/models/{DeployConfig().model_name}" and probe.port == "http"
    assert container.liveness_probe is not None
    assert container.resources.requests and container.resources.limits
    assert (
        pod.security_context.run_as_non_root
        and container.security_context.allow_privilege_escalation is False
    )
    assert {p.port for p in service.spec.ports} == {8500, 8501}
    assert {p.target_port for p in service.spec.ports} == {"grpc", "http"}
    assert service.spec.selector.items() <= deployment.spec.template.metadata.labels.items()
    assert (
        deployment.spec.selector.match_labels.items()
        <= deployment.spec.template.metadata.labels.items()
    )


def test_tf_serving_reads_the_models_config_that_deploy_writes() -> None:
    """One truth of what is served: no ConfigMap holds a models.config of its own; the server
    polls `<model_base_path>/models.config`, the path deploy, rollback and promote write for the
    pipeline's `deploy.model_base_path`, and reads the bucket as a Workload Identity account."""
    objects = by_name(render(K8S / "base"))
    pod = one(objects, "Deployment").spec.template.spec
    (container,) = pod.containers
    config_maps = {key: model for key, model in objects.items() if key.startswith("ConfigMap/")}
    assert not any(serving_layout.MODELS_CONFIG in (m.data or {}) for m in config_maps.values())
    args = effective_args(container, objects)
    settings = objects["ConfigMap/tumorflow-serving-settings"].data
    assert settings["model_base_path"].startswith("gs://")
    pipeline = PipelineConfig(deploy=DeployConfig(model_base_path=settings["model_base_path"]))
    written = serving_layout.models_config_uri(pipeline.resolved_model_base_path())
    assert args["model_config_file"] == written == "gs://tumorflow-models/serving/models.config"
    assert 0 < int(args["model_config_file_poll_wait_seconds"]) <= 60, "changes must arrive"
    account = objects[f"ServiceAccount/{pod.service_account_name}"]
    assert account.metadata.annotations["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )


def test_gpu_overlay_asks_for_a_gpu_and_keeps_the_base() -> None:
    base = one(by_name(render(K8S / "base")), "Deployment").spec.template.spec
    gpu = one(by_name(render(K8S / "overlays" / "gpu")), "Deployment").spec.template.spec
    (container,) = gpu.containers
    assert container.image == "tensorflow/serving:2.19.0-gpu"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert any(t.key == "nvidia.com/gpu" for t in gpu.tolerations) and gpu.node_selector
    assert container.args == base.containers[0].args and container.env == base.containers[0].env
    assert container.readiness_probe == base.containers[0].readiness_probe


def test_serving_and_console_share_the_namespace_the_console_reaches_serving_in() -> None:
    serving = by_name(render(K8S / "base"))
    console = by_name(render(K8S / "console"))
    assert "Namespace/tumorflow" in serving
    for objects in (serving, console):
        assert {o.metadata.namespace for k, o in objects.items() if "Namespace/" not in k} == {
            "tumorflow"
        }
    settings = yaml.safe_load(one(console, "ConfigMap").data["console.yaml"])
    service = one(serving, "Service")
    assert settings["console"]["model_server"] == (
        f"{service.metadata.name}.{service.metadata.namespace}.svc:"
        f"{_container_port(one(serving, 'Deployment').spec.template.spec.containers[0], 'grpc')}"
    )
    # and the MLflow server where infra/k8s/mlflow puts it
    mlflow = by_name(render(K8S / "mlflow"))["Service/mlflow"]
    assert settings["tracking"]["tracking_uri"] == (
        f"http://{mlflow.metadata.name}.{mlflow.metadata.namespace}.svc.cluster.local:"
        f"{mlflow.spec.ports[0].port}"
    )
    # each pod answers only its own ports
    policy = serving["NetworkPolicy/tumorflow-serving"]
    assert {p.port for p in policy.spec.ingress[0].ports} == {8500, 8501}
    assert policy.spec.pod_selector.match_labels.items() <= (
        one(serving, "Deployment").spec.template.metadata.labels.items()
    )
