"""The console's pages and decisions through HTTP: sign-in, roles, CSRF, the audit log."""

from __future__ import annotations

import pytest


def test_nobody_sees_anything_without_signing_in(console_factory, approval_candidate):
    model, run = approval_candidate(passed=True)
    client_for, _ = console_factory(model)
    client = client_for()
    assert client.get("/").headers["location"] == "/login"
    assert client.get(f"/runs/{run}").status_code == 303
    assert client.post(f"/runs/{run}/decide", data={"action": "approve"}).status_code == 401
    refused = client.post("/login", data={"token": "guessed"})
    assert refused.status_code == 401 and "unknown token" in refused.text


def test_the_session_cookie_is_httponly_and_samesite(console_factory, approval_candidate):
    model, run = approval_candidate(passed=True)
    client_for, _ = console_factory(model)
    client = client_for()
    response = client.post("/login", data={"token": "alice-secret-token"})
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert "alice-secret-token" not in cookie
    runs = client.get("/")
    assert run in runs.text and "waiting" in runs.text and ">alice<" in runs.text


def test_a_forged_session_cookie_is_not_an_identity(console_factory, approval_candidate):
    model, _ = approval_candidate(passed=True)
    client_for, _ = console_factory(model)
    client = client_for()
    client.cookies.set("tumorflow_session", "alice|" + "0" * 64)
    assert client.get("/").status_code == 303


def test_an_approver_approves_the_waiting_run_as_herself_and_it_is_audited(
    console_factory, approval_candidate, approval_waiter, sign_in, csrf_of
):
    model, run = approval_candidate(passed=True)
    client_for, settings = console_factory(model)
    thread, result = approval_waiter(model, run, 60)
    client = client_for()
    sign_in(client, "alice")
    csrf = csrf_of(client, f"/runs/{run}")
    # The form's identity is ignored: `by` is the signed-in user.
    answer = client.post(
        f"/runs/{run}/decide", data={"action": "approve", "csrf": csrf, "by": "mallory"}
    )
    assert answer.status_code == 303
    thread.join(30)
    assert result[0].status == "approved" and result[0].by == "alice"
    audit = client.get("/audit").text
    assert "alice" in audit and "approval" in audit and run in audit
    assert settings.audit_path.read_text().count("\n") == 1
    again = client.post(
        f"/runs/{run}/decide", data={"action": "reject", "reason": "x", "csrf": csrf}
    )
    assert again.status_code == 409 and "already approved" in again.text


def test_a_viewer_gets_403_on_approve_and_the_run_stays_waiting(
    console_factory, approval_candidate, sign_in, csrf_of
):
    model, run = approval_candidate(passed=True)
    client_for, _ = console_factory(model)
    client = client_for()
    sign_in(client, "victor")
    csrf = csrf_of(client, f"/runs/{run}")
    refused = client.post(f"/runs/{run}/decide", data={"action": "approve", "csrf": csrf})
    assert refused.status_code == 403 and "victor is no approver" in refused.text
    assert "waiting" in client.get("/").text


@pytest.mark.parametrize("csrf", [None, "", "f" * 64])
def test_a_post_without_the_right_csrf_token_is_refused(
    console_factory, approval_candidate, sign_in, csrf
):
    model, run = approval_candidate(passed=True)
    client_for, settings = console_factory(model)
    client = client_for()
    sign_in(client, "alice")
    data = {"action": "approve"} | ({} if csrf is None else {"csrf": csrf})
    refused = client.post(f"/runs/{run}/decide", data=data)
    assert refused.status_code == 403 and "CSRF" in refused.text
    assert "waiting" in client.get("/").text and not settings.audit_path.exists()


def test_reject_and_override_need_a_reason(console_factory, approval_candidate, sign_in, csrf_of):
    model, run = approval_candidate(passed=False)
    client_for, _ = console_factory(model)
    client = client_for()
    sign_in(client, "alice")
    csrf = csrf_of(client, f"/runs/{run}")
    review = client.get(f"/runs/{run}").text
    assert 'id="override"' in review and 'id="approve"' not in review
    for action in ("reject", "override"):
        refused = client.post(
            f"/runs/{run}/decide", data={"action": action, "reason": "  ", "csrf": csrf}
        )
        assert refused.status_code == 409 and "needs a reason" in refused.text
    plain = client.post(f"/runs/{run}/decide", data={"action": "approve", "csrf": csrf})
    assert plain.status_code == 409 and "gate failed" in plain.text
    done = client.post(
        f"/runs/{run}/decide",
        data={"action": "override", "reason": "checked the cysts by hand", "csrf": csrf},
    )
    assert done.status_code == 303
    assert "checked the cysts by hand" in client.get("/audit").text


def test_behind_a_proxy_the_header_is_the_identity_and_its_absence_is_refused(
    console_factory, approval_candidate
):
    model, run = approval_candidate(passed=True)
    client_for, _ = console_factory(
        model, auth="proxy", proxy_header="X-Goog-Authenticated-User-Email"
    )
    client = client_for()
    assert client.get("/").status_code == 401
    headers = {"X-Goog-Authenticated-User-Email": "accounts.google.com:victor"}
    page = client.get(f"/runs/{run}", headers=headers)
    assert page.status_code == 200 and 'id="user">victor<' in page.text
    assert "may view this run but not decide" in page.text


def test_the_review_page_shows_the_gate_the_classes_and_the_changed_and_wrong_images(
    console_factory, approval_candidate, sign_in, write_run_folder
):
    model, run = approval_candidate(passed=True)
    client_for, settings = console_factory(model)
    write_run_folder(settings.run_root, run)
    client = client_for()
    sign_in(client, "victor")
    page = client.get(f"/runs/{run}").text
    assert "recall:tumor vs champion" in page and "0.9100" in page and "0.8800" in page
    assert "[-0.010, 0.070]" in page and "champion version 3" in page
    assert "re-scored champion 3" in page
    assert page.count('class="confusion"') == 2
    assert "Tumor/7.jpg" in page and "Cyst/1.jpg" not in page
    changed = page.split('id="changed"')[1].split("</table>")[0]
    wrong = page.split('id="wrong"')[1].split("</table>")[0]
    assert "Tumor/7.jpg" in changed and "Cyst/2.jpg" in changed
    assert "Tumor/7.jpg" in wrong and "Cyst/2.jpg" not in wrong
    overlay = f"/runs/{run}/files/gate/decision/overlays/000.png"
    assert f'src="{overlay}"' in changed and f'src="{overlay}"' in wrong
    assert f'src="/runs/{run}/files/gate/decision/overlays/001.png"' in changed
    assert client.get(overlay).content.startswith(b"\x89PNG")
    roc = f"/runs/{run}/files/evaluate/evaluation/roc.png"
    assert roc in page
    assert client.get(roc).content.startswith(b"\x89PNG")
    assert client.get(f"/runs/{run}/files/../../../etc/passwd").status_code == 404


def test_the_review_url_of_a_run_is_the_page_the_console_serves(
    console_factory, approval_candidate, sign_in
):
    model, run = approval_candidate(passed=True)
    client_for, settings = console_factory(model, base_url="http://testserver/")
    client = client_for()
    sign_in(client, "victor")
    url = settings.console.review_url(run)
    assert url == f"http://testserver/runs/{run}"
    assert client.get(url).status_code == 200


def test_forged_approval_tags_leave_the_run_waiting_and_the_page_says_why(
    console_factory, approval_candidate, approval_waiter, sign_in, mlflow_server
):
    from mlflow import MlflowClient

    model, run = approval_candidate(passed=True)
    client_for, _ = console_factory(model)
    thread, result = approval_waiter(model, run, 3)
    registry = MlflowClient(mlflow_server)
    (version,) = registry.search_model_versions(f"name = '{model}'")
    registry.set_model_version_tag(model, version.version, "approval.by", "alice")
    registry.set_model_version_tag(model, version.version, "approval.status", "approved")
    client = client_for()
    sign_in(client, "alice")
    assert 'id="approve"' in client.get(f"/runs/{run}").text  # still waiting for a decision
    thread.join(30)
    assert result[0].status == "timed_out"
    page = client.get(f"/runs/{run}").text
    assert "Refused: approval.status=approved" in page and "not a signed decision" in page
