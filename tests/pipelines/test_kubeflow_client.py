"""One Kubeflow Pipelines client: submitting a run and scheduling one fail the same way."""

from __future__ import annotations

import pytest

from tumorflow.core.config import PipelineConfig
from tumorflow.pipelines.kubeflow_client import kfp_message
from tumorflow.pipelines.runner import PipelineRunError, submit
from tumorflow.pipelines.schedule import ScheduleError
from tumorflow.pipelines.schedule_kubeflow import KubeflowScheduler

UNREACHABLE = "http://127.0.0.1:9"


def test_an_unreachable_host_is_the_same_one_line_for_a_run_and_a_schedule():
    config = PipelineConfig.model_validate(
        {"tracking": {"tracking_uri": "http://mlflow.example:5000"}}
    )
    with pytest.raises(PipelineRunError) as submitted:
        submit(config, UNREACHABLE)
    with pytest.raises(ScheduleError) as scheduled:
        KubeflowScheduler(UNREACHABLE, "tumorflow").list()

    expected = f"cannot reach Kubeflow Pipelines at {UNREACHABLE}"
    assert str(submitted.value).startswith(expected) and "\n" not in str(submitted.value)
    assert str(scheduled.value).startswith(expected)


def test_an_api_refusal_shows_the_server_s_own_message():
    assert kfp_message(b'{"error_message": "cron schedule\\n is invalid"}') == (
        "cron schedule is invalid"
    )
    assert kfp_message("plain text") == "plain text"
