from __future__ import annotations

import getpass
import json
import threading
import uuid

import pytest
from helpers import wait_until

from tumorflow.cli.main import main

pytestmark = pytest.mark.service


def _model() -> str:
    return f"m-{uuid.uuid4().hex[:6]}"


def test_set_and_show_a_policy_recording_who_set_it(mlflow_server, capsys):
    name, uri = _model(), ["--tracking-uri", mlflow_server]
    assert main(["policy", "show", name, *uri]) == 0
    assert "no approval policy stored" in capsys.readouterr().out

    assert (
        main(["policy", "set", name, "--approval", "manual", "--approvers", "alice, bob", *uri])
        == 0
    )
    capsys.readouterr()
    assert main(["policy", "show", name, "--json", *uri]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["approval"] == "manual" and shown["approvers"] == ["alice", "bob"]
    assert shown["set_by"] == getpass.getuser() and shown["set_at"]

    # only the approvers change; the approval mode is kept, and `anyone` is shown for ''
    assert main(["policy", "set", name, "--approvers", "", *uri]) == 0
    out = capsys.readouterr().out
    assert "approval       manual" in out and "approvers      anyone" in out


def test_who_set_a_policy_is_not_a_flag(mlflow_server, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["policy", "set", _model(), "--approval", "auto", "--by", "someone-else"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --by" in capsys.readouterr().err


def test_a_new_model_needs_an_approval_mode(mlflow_server, capsys):
    name = _model()
    assert (
        main(["policy", "set", name, "--approvers", "alice", "--tracking-uri", mlflow_server]) == 2
    )
    err = capsys.readouterr().err
    assert f"{name} has no approval policy yet: pass --approval auto or manual" in err
    assert err.count("\n") == 1


def test_approve_by_a_non_approver_is_refused_and_by_an_approver_continues_the_run(
    tmp_path, mlflow_server, capsys, approval_announcements
):
    """A run configured `auto` waits under the model's manual policy until an approver decides."""
    from tumorflow.components.release.approval import run_approval
    from tumorflow.core.config import GateConfig

    name, uri, me = _model(), ["--tracking-uri", mlflow_server], getpass.getuser()
    assert main(["policy", "set", name, "--approval", "manual", "--approvers", "dr-lee", *uri]) == 0
    (tmp_path / "decision").mkdir()
    (tmp_path / "decision" / "decision.json").write_text(json.dumps({"passed": True}))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_info.json").write_text("{}")
    result: list = []
    step = threading.Thread(
        target=lambda: result.append(
            run_approval(
                tmp_path / "decision",
                tmp_path / "model",
                GateConfig(approval="auto", approval_timeout_s=60, approval_poll_s=0.2),
                tracking_uri=mlflow_server,
                model_name=name,
                pipeline_run="run-" + name,
                output_dir=tmp_path / "record",
            )
        )
    )
    step.start()
    wait_until(
        lambda: "run-" + name in approval_announcements or not step.is_alive(),
        30,
        "the approval step waiting",
    )
    assert step.is_alive(), "the auto-configured run did not wait for a person"

    capsys.readouterr()
    assert main(["approve", "run-" + name, *uri]) == 2
    err = capsys.readouterr().err
    assert f"{me} may not approve {name}: its approval policy allows only dr-lee" in err
    assert err.count("\n") == 1
    assert step.is_alive()

    assert main(["policy", "set", name, "--approvers", f"dr-lee,{me}", *uri]) == 0
    assert main(["approve", "run-" + name, "--comment", "read the report", *uri]) == 0
    step.join(timeout=30)
    (decision,) = result
    assert decision.approved and decision.by == me and decision.policy == "manual"
    record = json.loads((tmp_path / "record" / "approval.json").read_text())
    assert record["by"] == me and record["policy_source"].startswith(
        f"model policy manual, set by {me} at "
    )
