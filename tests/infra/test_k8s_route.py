"""The router's manifests (infra/k8s/route) render into valid objects beside TF Serving: the
configuration is one `tumorflow route` accepts, the PACS login comes from a Secret, the pod is
non-root with probes and limits, and checkov finds nothing (where it is installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml
from infra.test_k8s_manifests import K8S, by_name, one, render

from tumorflow.core.config import PipelineConfig

ROUTE = K8S / "route"


def test_the_router_runs_beside_tf_serving_with_the_pacs_login_from_a_secret():
    objects = by_name(render(ROUTE))
    deployment = one(objects, "Deployment")
    assert deployment.metadata.namespace == "tumorflow"
    pod = deployment.spec.template.spec
    assert pod.security_context.run_as_non_root and pod.security_context.run_as_user
    [container] = pod.containers
    assert container.args[:2] == ["tumorflow", "route"]
    assert container.readiness_probe and container.liveness_probe
    assert container.resources.limits["cpu"] and container.resources.limits["memory"]
    assert container.security_context.read_only_root_filesystem
    mounts = {m.name: m.mount_path for m in container.volume_mounts}
    volumes = {v.name: v for v in pod.volumes}
    secret = volumes["pacs-credentials"].secret.secret_name

    config = PipelineConfig.model_validate(
        yaml.safe_load(one(objects, "ConfigMap").data["route.yaml"])
    )
    route = config.route
    assert route.pacs.credentials_file.startswith(mounts["pacs-credentials"] + "/")
    assert secret == "tumorflow-pacs" and not container.env
    base = by_name(render(K8S / "base"))
    serving = one(base, "Service")
    host, port = route.model_server.split(":")
    assert host.split(".")[:2] == [serving.metadata.name, serving.metadata.namespace]
    assert int(port) in [p.port for p in serving.spec.ports if p.name == "grpc"]
    assert Path(route.state_file).is_relative_to(mounts["state"])
    metrics_port = [p.container_port for p in container.ports if p.name == "metrics"]
    assert metrics_port == [route.metrics_port] and route.metrics_host == "0.0.0.0"
    policy = one(objects, "NetworkPolicy")
    assert [p.port for p in policy.spec.ingress[0].ports] == [route.metrics_port]


def test_rendered_route_manifests_have_no_failed_checkov_check(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "checkov_checks", Path(__file__).with_name("test_checkov.py")
    )
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    checkov = checks._checkov()
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump_all(render(ROUTE), sort_keys=False))
    checks._assert_clean(checks._run(checkov, tmp_path, "kubernetes"))
