"""The console in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
sign in, review the run an approval step waits on, approve; a viewer's 403; rollback from Models.
Screenshots go to `<pytest tmp>/screenshots/` (the path is printed)."""

from __future__ import annotations

import pytest
from helpers import wait_until

pytestmark = pytest.mark.service


def test_a_reviewer_signs_in_reviews_the_waiting_run_and_approves_it(
    browser,
    live_console,
    approval_candidate,
    approval_waiter,
    screenshots,
    write_run_folder,
    sign_in_browser,
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    model, run = approval_candidate(passed=True)
    url, settings = live_console(model)
    write_run_folder(settings.run_root, run)
    thread, result = approval_waiter(model, run, 120)
    sign_in_browser(browser, url, "alice-secret-token")
    assert browser.find_element(By.ID, "user").text == "alice"
    row = browser.find_element(By.CSS_SELECTOR, "#runs tr.waiting")
    assert run in row.text
    browser.save_screenshot(str(screenshots / "runs.png"))
    row.find_element(By.LINK_TEXT, run).click()
    assert browser.find_element(By.ID, "state").text == "waiting"
    assert "recall:tumor vs champion" in browser.find_element(By.ID, "rules").text
    assert "Tumor/7.jpg" in browser.find_element(By.ID, "wrong").text
    assert "Cyst/2.jpg" in browser.find_element(By.ID, "changed").text
    overlays = browser.find_elements(By.CSS_SELECTOR, "#changed img.overlay")
    assert len(overlays) == 2
    # the overlays are loaded images, not broken links
    assert all(
        browser.execute_script("return arguments[0].naturalWidth", o) == 48 for o in overlays
    )
    load_ms = browser.execute_script(
        "return performance.getEntriesByType('navigation')[0].duration"
    )
    print(f"review page loaded in {load_ms:.0f} ms")
    browser.save_screenshot(str(screenshots / "review.png"))
    browser.find_element(By.ID, "reason").send_keys("looked at the wrong cysts")
    before = browser.find_element(By.ID, "state")
    browser.find_element(By.ID, "approve").click()
    thread.join(30)
    assert result and result[0].status == "approved" and result[0].by == "alice"
    # the POST answers with the same page again: wait until the old one is gone
    WebDriverWait(browser, 30).until(staleness_of(before))
    assert browser.find_element(By.ID, "state").text == "approved"
    browser.get(f"{url}/audit")
    assert "alice" in browser.find_element(By.ID, "audit").text
    browser.save_screenshot(str(screenshots / "audit.png"))


def test_a_viewer_sees_no_decision_form_and_gets_403_posting_one(
    browser, live_console, approval_candidate, screenshots, sign_in_browser
):
    from selenium.webdriver.common.by import By

    model, run = approval_candidate(passed=True)
    url, _ = live_console(model)
    sign_in_browser(browser, url, "victor-secret-token")
    browser.get(f"{url}/runs/{run}")
    browser.find_element(By.NAME, "csrf")  # the page is there (implicit wait)
    browser.implicitly_wait(0)  # an absent element is not waited for
    assert not browser.find_elements(By.ID, "decide")
    assert "may view this run but not decide" in browser.page_source
    csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")
    status = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", body: new URLSearchParams(
            {action: "approve", csrf: arguments[1]})}).then(r => done(r.status));""",
        f"{url}/runs/{run}/decide",
        csrf,
    )
    assert status == 403
    browser.save_screenshot(str(screenshots / "viewer.png"))


def test_rollback_from_the_models_page_moves_the_served_label(
    browser, live_console, tmp_path, mlflow_server, screenshots, sign_in_browser
):
    import uuid

    import mlflow
    from selenium.webdriver.common.by import By

    from tumorflow.components.release import registry
    from tumorflow.core import serving_layout

    model = f"m-{uuid.uuid4().hex[:6]}"
    base = tmp_path / "models"
    folder = tmp_path / "model-folder"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"weights")
    (folder / "model_info.json").write_text('{"classes": ["a", "b"], "image_size": [32, 32]}')
    client = mlflow.MlflowClient(mlflow_server)
    for version in (1, 2):
        (base / model / str(version)).mkdir(parents=True)
        (base / model / str(version) / "saved_model.pb").write_bytes(b"")
        registered = registry.register_model_version(
            client, model, folder, {registry.TAG_SERVING_VERSION: str(version)}
        )
        registry.move_champion(client, model, registered.version)
    serving_layout.edit_serving_config(
        str(base),
        lambda config: serving_layout.set_served_versions(
            config, str(base), model, stable=2, keep_versions=2
        ),
    )
    url, _ = live_console(model, str(base))
    sign_in_browser(browser, url, "alice-secret-token")
    browser.get(f"{url}/models")
    assert browser.find_element(By.CSS_SELECTOR, ".label-stable").text == "2"
    browser.find_element(By.ID, f"rollback-{model}").click()
    browser.save_screenshot(str(screenshots / "rollback-confirm.png"))
    browser.find_element(By.ID, "reason").send_keys("version 2 misses stones")
    browser.find_element(By.ID, "confirm-button").click()
    # the page after the POST: wait for it rather than read the one still showing
    wait_until(
        lambda: (
            browser.current_url.endswith("/models")
            and browser.find_elements(By.CSS_SELECTOR, ".label-stable")
        ),
        30,
        "the Models page after the rollback",
    )
    assert browser.find_element(By.CSS_SELECTOR, ".label-stable").text == "1"
    assert serving_layout.serving_labels(str(base), model)[0]["stable"] == 1
    assert "version 2 misses stones" in browser.page_source
    browser.save_screenshot(str(screenshots / "models.png"))
