"""A real `tumorflow run` (kfp.local) waits at approval; a reviewer signs in in headless Chromium,
reviews that run's evidence, approves, and the run goes on to deploy. Screenshots go to the
test's tmp dir (the path is printed), and the review page's load time (navigation timing) too.

`TUMORFLOW_REVIEW_DEMO=1 pytest tests/console/test_review_e2e.py -k demo -s` measures the load
time on a demo-sized run (the phantom preset's defaults, what `make demo` runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import TINY_CONFIG, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def _start_run(tmp_path: Path, tracking_uri: str, model: str, config_file: Path | None):
    """`tumorflow run` with manual approval in a background process; returns (process, config,
    log path)."""
    from tumorflow.core.config import load_config

    settings = [
        f"run_root={tmp_path / 'runs'}",
        f"tracking.tracking_uri={tracking_uri}",
        f"deploy.model_name={model}",
        "gate.approval=manual",
        "gate.approval_poll_s=0.5",
        "gate.approval_timeout_s=900",
    ]
    config = load_config(config_file, preset="phantom", overrides=settings)
    log = tmp_path / "run.log"
    command = [sys.executable, "-m", "tumorflow.cli.main", "run", "--preset", "phantom"]
    if config_file:
        command += ["--config", str(config_file)]
    for setting in settings:
        command += ["--set", setting]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    return process, config, log


def _waiting_run(tracking_uri: str, model: str, process, log: Path, timeout: float) -> str:
    """The pipeline run whose candidate waits for a decision (fails at once if the run died)."""
    from tumorflow.components.release import registry

    def waiting() -> str | None:
        if process.poll() is not None:
            raise AssertionError(f"tumorflow run exited with {process.returncode}:\n{_tail(log)}")
        client = registry.connect(tracking_uri)
        for version in registry.list_versions(client, model):
            if version.tags.get("approval.status") == "pending":
                return version.tags[registry.TAG_PIPELINE_RUN]
        return None

    return wait_until(waiting, timeout, "the pipeline run waiting for approval", interval=1)


def _whole_page(browser, path: Path) -> None:
    """A screenshot of the whole page, not only the window's height."""
    width, height = browser.get_window_size().values()
    tall = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, max(height, tall + 120))
    browser.save_screenshot(str(path))
    browser.set_window_size(width, height)


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-40:])


def _review_and_approve(
    browser, live_console, sign_in_browser, tmp_path, mlflow_server, config_file, timeout
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    from tumorflow.core import serving_layout

    model = f"review-{uuid.uuid4().hex[:6]}"
    process, config, log = _start_run(tmp_path, mlflow_server, model, config_file)
    try:
        run = _waiting_run(mlflow_server, model, process, log, timeout)
        # the run told its user what to type (tests/cli/test_cli_model.py types it)
        prompt = f"waiting for: tumorflow approve {run}"
        wait_until(lambda: prompt in log.read_text(), 60, "the run printing what to type")
        base = config.resolved_model_base_path()
        url, _ = live_console(model, base, Path(config.run_root))
        sign_in_browser(browser, url, "alice-secret-token")
        row = browser.find_element(By.CSS_SELECTOR, "#runs tr.waiting")
        assert run in row.text
        row.find_element(By.LINK_TEXT, run).click()
        assert browser.find_element(By.ID, "state").text == "waiting"
        load_ms = browser.execute_script(
            "return performance.getEntriesByType('navigation')[0].duration"
        )
        # the evidence the gate left for this run: its rules, and the review images, each with
        # the challenger's Grad-CAM overlay, loaded
        (review_file,) = (Path(config.run_root) / "pipeline_root" / run).rglob("review_images.json")
        reviewed = json.loads(review_file.read_text())
        rules = browser.find_element(By.ID, "rules").text
        decision = json.loads((review_file.parent / "decision.json").read_text())
        assert decision["rules"] and all(r["name"] in rules for r in decision["rules"])
        shown = browser.find_elements(By.CSS_SELECTOR, "#changed img.overlay, #wrong img.overlay")
        wrong = [e for e in reviewed if "wrong" in e["reasons"]]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#wrong img.overlay")) == len(wrong)
        assert all(browser.execute_script("return arguments[0].naturalWidth", i) for i in shown)
        _whole_page(browser, tmp_path / "review-of-a-waiting-run.png")
        browser.find_element(By.ID, "reason").send_keys("evidence reviewed")
        before = browser.find_element(By.ID, "state")
        browser.find_element(By.ID, "approve").click()
        # the POST answers with the same page again: wait until the old one is gone
        WebDriverWait(browser, 60).until(staleness_of(before))
        assert browser.find_element(By.ID, "state").text in ("approved", "deployed")
        process.wait(timeout=600)
        assert process.returncode == 0, _tail(log)
        served = serving_layout.served_version(base, model)
        assert served is not None
        # the pipeline UI's report of the approval task links to this run's review page
        report = Path(config.run_root) / "pipeline_root" / run / "approval" / "report"
        assert f"]({config.console.review_url(run)})" in report.read_text()
        browser.get(f"{url}/models")
        assert browser.find_element(By.CSS_SELECTOR, ".label-stable").text == str(served.version)
        _whole_page(browser, tmp_path / "models-after-deploy.png")
        print(f"screenshots in {tmp_path}")
        return load_ms, len(reviewed)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def test_a_reviewer_approves_the_run_a_real_pipeline_waits_on_and_it_deploys(
    browser, live_console, sign_in_browser, tmp_path, mlflow_server
):
    load_ms, reviewed = _review_and_approve(
        browser, live_console, sign_in_browser, tmp_path, mlflow_server, TINY_CONFIG, 900
    )
    print(f"review page of a tiny run ({reviewed} review images) loaded in {load_ms:.0f} ms")


@pytest.mark.skipif(
    not os.environ.get("TUMORFLOW_REVIEW_DEMO"), reason="set TUMORFLOW_REVIEW_DEMO=1 (minutes)"
)
def test_review_page_load_time_on_the_demo_run(
    browser, live_console, sign_in_browser, tmp_path, mlflow_server
):
    load_ms, reviewed = _review_and_approve(
        browser, live_console, sign_in_browser, tmp_path, mlflow_server, None, 3600
    )
    print(f"review page of the demo run ({reviewed} review images) loaded in {load_ms:.0f} ms")
