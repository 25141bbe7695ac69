"""The console's manifests (infra/k8s/console) render into valid objects, put the console behind
oauth2-proxy on loopback, and carry a configuration the console accepts."""

from __future__ import annotations

import yaml
from infra.test_k8s_manifests import K8S, by_name, one, render

from tumorflow.core.config import PipelineConfig


def test_the_console_is_reachable_only_through_the_authenticating_proxy():
    objects = by_name(render(K8S / "console"))
    deployment = one(objects, "Deployment")
    containers = {c.name: c for c in deployment.spec.template.spec.containers}
    assert set(containers) == {"oauth2-proxy", "console"}
    proxy, console = containers["oauth2-proxy"], containers["console"]
    assert [p.container_port for p in proxy.ports] == [4180] and not console.ports
    assert "--upstream=http://127.0.0.1:8080/" in proxy.args
    assert console.args[console.args.index("--host") + 1] == "127.0.0.1"
    service = one(objects, "Service")
    assert [p.target_port for p in service.spec.ports] == ["http"]
    assert service.spec.selector == deployment.spec.template.metadata.labels


def test_the_configmap_is_a_proxy_mode_console_configuration():
    objects = by_name(render(K8S / "console"))
    settings = yaml.safe_load(one(objects, "ConfigMap").data["console.yaml"])
    config = PipelineConfig.model_validate(settings)
    assert config.console.auth == "proxy" and config.console.port == 8080
    assert config.console.roles["kidney-ct"]["approver"]
