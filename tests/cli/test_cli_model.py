from __future__ import annotations

import json
import time
import uuid

import pytest
from helpers import free_port

from tumorflow.cli.main import main

pytestmark = pytest.mark.service


def _as(signing, name: str) -> list[str]:
    """The flags of a command signed with `name`'s key under the test's trust root."""
    return ["--run-root", str(signing.run_root), "--key", str(signing.key_path(name))]


def test_approve_while_a_run_waits(
    tmp_path, mlflow_server, capsys, approval_candidate, approval_waiter, signing
):
    name, run = approval_candidate(passed=True)
    thread, result = approval_waiter(name, run, timeout_s=60)
    code = main(
        [
            "approve",
            run,
            "--comment",
            "checked the tumor cases",
            "--tracking-uri",
            mlflow_server,
            *_as(signing, "alice"),
        ]
    )
    thread.join(timeout=30)
    assert code == 0
    assert f"of run {run}: approved by alice" in capsys.readouterr().out
    assert result[0].approved and result[0].comment == "checked the tumor cases"
    assert result[0].records[0]["record"]["signer"] == "alice"


def test_a_non_approvers_key_or_a_borrowed_name_is_refused(
    tmp_path, mlflow_server, capsys, approval_candidate, signing
):
    _, run = approval_candidate(passed=True)
    uri = ["--tracking-uri", mlflow_server]
    assert main(["approve", run, *uri, *_as(signing, "bob")]) == 2
    assert "bob may not approve" in capsys.readouterr().err
    assert main(["approve", run, *uri, *_as(signing, "bob"), "--as", "alice"]) == 2
    assert "belongs to bob in the trust root, not alice" in capsys.readouterr().err
    assert main(["approve", run, *uri, *_as(signing, "alice"), "--by", "alice"]) == 2
    assert "--by is gone" in capsys.readouterr().err


def test_reject_while_a_run_waits(
    tmp_path, mlflow_server, approval_candidate, approval_waiter, signing
):
    name, run = approval_candidate(passed=True)
    thread, result = approval_waiter(name, run, timeout_s=60)
    args = ["reject", run, "--reason", "bad on MRI", "--tracking-uri", mlflow_server]
    assert main([*args, *_as(signing, "alice")]) == 0
    thread.join(timeout=30)
    assert result[0].status == "rejected" and "bad on MRI" in result[0].reason


def test_a_run_that_times_out_cannot_be_approved_later(
    tmp_path, mlflow_server, capsys, approval_candidate, approval_waiter, signing
):
    name, run = approval_candidate(passed=True)
    thread, result = approval_waiter(name, run, timeout_s=1)
    thread.join(timeout=30)
    assert result[0].status == "timed_out"
    assert main(["approve", run, "--tracking-uri", mlflow_server, *_as(signing, "alice")]) == 2
    assert "already timed out" in capsys.readouterr().err


def test_override_of_a_failed_gate(tmp_path, mlflow_server, capsys, approval_candidate, signing):
    _, run = approval_candidate(passed=False)
    uri = ["--tracking-uri", mlflow_server, *_as(signing, "alice")]
    assert main(["approve", run, *uri]) == 2
    assert "--override" in capsys.readouterr().err
    assert main(["approve", run, "--override", *uri]) == 2
    assert "needs a reason" in capsys.readouterr().err
    assert main(["approve", run, "--override", "--reason", "known label noise", *uri]) == 0
    assert "override of a failed gate" in capsys.readouterr().out


def test_unknown_run_and_unreachable_server_are_clear(mlflow_server, capsys, signing):
    assert (
        main(["approve", "no-such-run", "--tracking-uri", mlflow_server, *_as(signing, "alice")])
        == 2
    )
    assert "has no candidate model version" in capsys.readouterr().err
    closed_port = free_port()
    started = time.monotonic()
    assert (
        main(
            [
                "reject",
                "r1",
                "--reason",
                "x",
                "--tracking-uri",
                f"http://127.0.0.1:{closed_port}",
                *_as(signing, "alice"),
            ]
        )
        == 2
    )
    assert "is not reachable" in capsys.readouterr().err
    assert time.monotonic() - started < 10


def test_rollback_and_status(tmp_path, mlflow_server, capsys, signing):
    from mlflow import MlflowClient

    from tumorflow.components.release.registry import move_champion, register_model_version
    from tumorflow.core.serving_layout import (
        edit_serving_config,
        serving_labels,
        set_served_versions,
    )

    name, base = f"m-{uuid.uuid4().hex[:6]}", tmp_path / "models"
    client = MlflowClient(mlflow_server)
    for serving_version in (1, 2):
        (base / name / str(serving_version)).mkdir(parents=True)
        (base / name / str(serving_version) / "saved_model.pb").write_bytes(b"pb")
        folder = tmp_path / f"model{serving_version}"
        folder.mkdir()
        (folder / "model_info.json").write_text("{}")
        tags = {
            "serving_version": str(serving_version),
            "tumorflow.pipeline_run": f"run{serving_version}",
        }
        move_champion(client, name, register_model_version(client, name, folder, tags).version)
    edit_serving_config(
        str(base),
        lambda config: set_served_versions(config, str(base), name, stable=2, keep_versions=2),
    )
    common = ["--model-name", name, "--model-base-path", str(base), "--tracking-uri", mlflow_server]

    # Unsigned (no key of one's own anywhere): nothing moves.
    missing = ["--key", str(tmp_path / "no-key")]
    assert main(["rollback", *common, "--run-root", str(signing.run_root), *missing]) == 2
    assert "cannot read the signing key" in capsys.readouterr().err
    assert main(["rollback", *common, *_as(signing, "bob")]) == 2
    assert "bob may not rollback" in capsys.readouterr().err
    assert serving_labels(str(base), name) == ({"stable": 2, "previous": 1}, [1, 2])
    assert main(["rollback", "--reason", "drift", *common, *_as(signing, "carol")]) == 0
    assert "stable -> served version 1 (was 2)" in capsys.readouterr().out
    assert serving_labels(str(base), name) == ({"stable": 1}, [1])
    assert client.get_registered_model(name).aliases == {"champion": "1", "previous": "2"}

    assert main(["status", "--json", *common, "--run-root", str(signing.run_root)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["serving"]["labels"] == {"stable": 1}
    assert status["aliases"] == {"champion": "1", "previous": "2"}
    assert status["versions"][1]["rollback"]["by"] == "carol"
    # Hand-made versions carry no release record: `tumorflow serve` would not load them.
    assert status["serving"]["unsigned"] == {"1": "unsigned: no release record"}
    assert main(["rollback", "--to", "7", *common, *_as(signing, "carol")]) == 2
    assert "not on disk" in capsys.readouterr().err
