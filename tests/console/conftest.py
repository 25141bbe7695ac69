"""The review console on a real MLflow server, signed in through its own login form; the
browser fixtures drive a real headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

TOKENS = {"alice": "alice-secret-token", "victor": "victor-secret-token"}


@pytest.fixture()
def console_factory(tmp_path: Path, mlflow_server: str, signing):
    """`console_factory(model_name, **console_overrides)` → (TestClient factory, settings):
    alice approves and rolls back `model_name`, victor views every model; the console signs
    with the `signing` fixture's delegate key, under its trust root."""
    from fastapi.testclient import TestClient

    from tumorflow.console.app import ConsoleSettings, create_app
    from tumorflow.console.auth import token_digest
    from tumorflow.core.config import ConsoleConfig

    def make(model_name: str, model_base_path: str = "", run_root: Path | None = None, **overrides):
        console = ConsoleConfig.model_validate(
            {
                "tokens": {user: token_digest(token) for user, token in TOKENS.items()},
                "signing_key": str(signing.key_path("console")),
                "roles": {
                    model_name: {"approver": ["alice"], "rollback": ["alice"]},
                    "*": {"viewer": ["victor"]},
                },
                **overrides,
            }
        )
        settings = ConsoleSettings(
            console=console,
            run_root=run_root or tmp_path / "runs",
            tracking_uri=mlflow_server,
            model_base_path=model_base_path or str(tmp_path / "models"),
            model_name=model_name,
            trust_root=str(signing.path),
        )
        app = create_app(settings)
        return (lambda: TestClient(app, follow_redirects=False)), settings

    return make


def _sign_in(client, user: str) -> None:
    response = client.post("/login", data={"token": TOKENS[user]})
    assert response.status_code == 303, response.text


def _csrf_of(client, path: str) -> str:
    import re

    page = client.get(path)
    assert page.status_code == 200, page.text
    return re.search(r'name="csrf" value="([0-9a-f]+)"', page.text).group(1)


@pytest.fixture()
def sign_in():
    """`sign_in(client, user)`: the login form with the user's token."""
    return _sign_in


@pytest.fixture()
def csrf_of():
    """`csrf_of(client, path)`: the CSRF token of the forms on a page."""
    return _csrf_of


def _write_run_folder(root, run: str) -> None:
    import json

    task = root / "pipeline_root" / run / "gate" / "decision"
    task.mkdir(parents=True)
    rule = {
        "name": "recall:tumor vs champion",
        "kind": "champion",
        "metric": "recall:tumor",
        "op": ">=",
        "threshold": -0.02,
        "bound": "lower",
        "value": 0.91,
        "champion_value": 0.88,
        "ci": [-0.01, 0.07],
        "passed": True,
        "detail": "",
    }
    (task / "decision.json").write_text(
        json.dumps(
            {
                "passed": True,
                "rules": [rule],
                "champion_version": "3",
                "classes": ["cyst", "tumor"],
                "confusion_matrices": {
                    "challenger": [[5, 1], [0, 6]],
                    "champion": [[4, 2], [1, 5]],
                },
                "notes": ["re-scored champion 3 on this test split"],
            }
        )
    )
    evaluate = root / "pipeline_root" / run / "evaluate" / "evaluation"
    evaluate.mkdir(parents=True)
    per_class = {"precision": 0.9, "recall": 0.8, "f1": 0.85, "specificity": 0.95, "support": 6}
    (evaluate / "metrics.json").write_text(
        json.dumps(
            {
                "classes": ["cyst", "tumor"],
                "accuracy": 0.92,
                "macro_f1": 0.91,
                "ece": 0.04,
                "per_class": {"cyst": per_class, "tumor": per_class},
            }
        )
    )
    (evaluate / "predictions.csv").write_text(
        "path,label_index,p_cyst,p_tumor\n"
        "Tumor/7.jpg,1,0.7,0.3\nCyst/1.jpg,0,0.9,0.1\nCyst/2.jpg,0,0.8,0.2\n"
    )
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    from tumorflow.components.evaluation.overlays import overlay_heatmap

    # the gate's review images: Tumor/7 now wrong (the champion had it right), Cyst/2 now right
    review = [
        {
            "path": "Tumor/7.jpg",
            "label": "tumor",
            "challenger": "cyst",
            "challenger_confidence": 0.7,
            "champion": "tumor",
            "champion_confidence": 0.8,
            "reasons": ["changed", "wrong"],
            "overlay": "overlays/000.png",
        },
        {
            "path": "Cyst/2.jpg",
            "label": "cyst",
            "challenger": "cyst",
            "challenger_confidence": 0.8,
            "champion": "tumor",
            "champion_confidence": 0.6,
            "reasons": ["changed"],
            "overlay": "overlays/001.png",
        },
    ]
    (task / "overlays").mkdir()
    scan = io.BytesIO()
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(scan, format="PNG")
    heat = np.zeros((12, 12), np.float32)
    heat[3:6, 6:9] = 1.0
    for entry in review:
        (task / entry["overlay"]).write_bytes(overlay_heatmap(scan.getvalue(), heat))
    (task / "review_images.json").write_text(json.dumps(review))

    roc = Image.new("RGB", (160, 120), "white")
    ImageDraw.Draw(roc).line([(10, 110), (30, 20), (150, 10)], fill="navy", width=3)
    roc.save(evaluate / "roc.png")


@pytest.fixture()
def write_run_folder():
    """`write_run_folder(run_root, run)`: the gate's and evaluate's files of a run, as the
    pipeline leaves them under the kfp.local pipeline root."""
    return _write_run_folder


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
    """`live_console(model_name, model_base_path="", run_root=None, **console)` → (base URL,
    settings): the app served by uvicorn on a free loopback port."""
    import uvicorn

    from tumorflow.console.app import create_app

    servers = []

    def start(model_name: str, model_base_path: str = "", run_root=None, **console):
        _, settings = console_factory(model_name, model_base_path, run_root, **console)
        # the listening socket is made here and handed over: no other process on this machine
        # can take the port between choosing it and serving on it
        listening = socket.create_server(("127.0.0.1", 0))
        port = listening.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        servers.append((server, thread, listening))
        assert server.started, f"the console did not start on port {port}"
        return f"http://127.0.0.1:{port}", settings

    yield start
    for server, thread, listening in servers:
        server.should_exit = True
        thread.join(10)
        listening.close()


def _sign_in_browser(driver, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/")
    assert driver.current_url.endswith("/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    driver.find_element(By.ID, "user")  # the signed-in page (implicit wait)


@pytest.fixture()
def sign_in_browser():
    """`sign_in_browser(driver, url, token)`: the login form in the browser; returns once the
    signed-in page shows."""
    return _sign_in_browser
