"""checkov over the Terraform and every Kubernetes manifest as it is applied (each kustomization
rendered, overlays patched in): no failed check; each skipped one says why where it is skipped
(`#checkov:skip=ID:reason`, `checkov.io/skipN: ID=reason`).

checkov pins versions the project's venv cannot take (packaging, networkx), so it lives in a
virtualenv of its own: `make checkov` (which CI runs) creates `.venv-checkov`; a `checkov` on
PATH does too. Without either the test is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
# Every kustomization that is applied on its own (infra/README.md).
KUSTOMIZATIONS = ("base", "overlays/gpu", "mlflow", "console", "training")

_spec = importlib.util.spec_from_file_location(
    "k8s_manifests_checks", Path(__file__).with_name("test_k8s_manifests.py")
)
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)


def _checkov() -> str:
    own = REPO / ".venv-checkov" / "bin" / "checkov"
    # The Makefile stamps the virtualenv when its install finished (CI installs it meanwhile).
    installed = any((REPO / ".venv-checkov").glob(".installed-*"))
    found = str(own) if own.exists() and installed else shutil.which("checkov")
    if found is None:
        if os.environ.get("TUMORFLOW_REQUIRE_CHECKOV"):
            pytest.fail("checkov is not installed and TUMORFLOW_REQUIRE_CHECKOV is set (CI)")
        pytest.skip("checkov is not installed: `make checkov` puts it in .venv-checkov")
    return found


def _run(checkov: str, target: Path, framework: str) -> dict:
    done = subprocess.run(
        [checkov, "-d", str(target), "--framework", framework, "-o", "json", "--skip-download"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    report = json.loads(done.stdout)
    # one framework gives one report; checkov gives a list when it ran several
    return report[0] if isinstance(report, list) else report


def _assert_clean(report: dict) -> None:
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert not failed, failed
    assert results["passed_checks"]
    for skipped in results["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment") or ""
        assert len(reason) > 20, skipped["check_id"]


def test_terraform_has_no_failed_check_and_every_skip_has_a_reason():
    _assert_clean(_run(_checkov(), INFRA / "terraform", "terraform"))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_manifests_have_no_failed_check_and_every_skip_has_a_reason(
    kustomization, tmp_path
):
    checkov = _checkov()
    documents = _checks.render(INFRA / "k8s" / kustomization)
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    _assert_clean(_run(checkov, tmp_path, "kubernetes"))
