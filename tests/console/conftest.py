"""The review console on a real MLflow server, signed in through its own login form."""

from __future__ import annotations

from pathlib import Path

import pytest

TOKENS = {"alice": "alice-secret-token", "victor": "victor-secret-token"}


@pytest.fixture()
def console_factory(tmp_path: Path, mlflow_server: str):
    """`console_factory(model_name, **console_overrides)` → (TestClient factory, settings):
    alice approves and rolls back `model_name`, victor views every model."""
    from fastapi.testclient import TestClient

    from tumorflow.console.app import ConsoleSettings, create_app
    from tumorflow.console.auth import token_digest
    from tumorflow.core.config import ConsoleConfig

    def make(model_name: str, model_base_path: str = "", **overrides):
        console = ConsoleConfig.model_validate(
            {
                "tokens": {user: token_digest(token) for user, token in TOKENS.items()},
                "roles": {
                    model_name: {"approver": ["alice"], "rollback": ["alice"]},
                    "*": {"viewer": ["victor"]},
                },
                **overrides,
            }
        )
        settings = ConsoleSettings(
            console=console,
            run_root=tmp_path / "runs",
            tracking_uri=mlflow_server,
            model_base_path=model_base_path or str(tmp_path / "models"),
            model_name=model_name,
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
