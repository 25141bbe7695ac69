"""The console in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
sign in, review the run an approval step waits on, approve; a viewer's 403; rollback from Models.
Screenshots go to `<pytest tmp>/screenshots/` (the path is printed)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from helpers import free_port, wait_until

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"console screenshots in {folder}")
    return folder


@pytest.fixture()
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("no system Chromium: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options
    )
    driver.set_page_load_timeout(60)
    # elements of the page a click leads to are looked for until they appear (a loaded machine)
    driver.implicitly_wait(10)
    yield driver
    driver.quit()


@pytest.fixture()
def live_console(console_factory):
    """`live_console(model_name, model_base_path="")` → (base URL, settings): the app served by
    uvicorn on a free loopback port."""
    import uvicorn

    from tumorflow.console.app import create_app

    servers = []

    def start(model_name: str, model_base_path: str = ""):
        _, settings = console_factory(model_name, model_base_path)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}", settings

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def _sign_in(driver, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/")
    assert driver.current_url.endswith("/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()


def test_a_reviewer_signs_in_reviews_the_waiting_run_and_approves_it(
    browser, live_console, approval_candidate, approval_waiter, screenshots, write_run_folder
):
    from selenium.webdriver.common.by import By

    model, run = approval_candidate(passed=True)
    url, settings = live_console(model)
    write_run_folder(settings.run_root, run)
    thread, result = approval_waiter(model, run, 120)
    _sign_in(browser, url, "alice-secret-token")
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
    browser.find_element(By.ID, "approve").click()
    thread.join(30)
    assert result and result[0].status == "approved" and result[0].by == "alice"
    assert browser.find_element(By.ID, "state").text == "approved"
    browser.get(f"{url}/audit")
    assert "alice" in browser.find_element(By.ID, "audit").text
    browser.save_screenshot(str(screenshots / "audit.png"))


def test_a_viewer_sees_no_decision_form_and_gets_403_posting_one(
    browser, live_console, approval_candidate, screenshots
):
    from selenium.webdriver.common.by import By

    model, run = approval_candidate(passed=True)
    url, _ = live_console(model)
    _sign_in(browser, url, "victor-secret-token")
    browser.get(f"{url}/runs/{run}")
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
    browser, live_console, tmp_path, mlflow_server, screenshots
):
    import uuid

    import mlflow
    from selenium.webdriver.common.by import By

    from tumorflow.components import registry
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
    _sign_in(browser, url, "alice-secret-token")
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
