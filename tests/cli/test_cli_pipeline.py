"""`tumorflow run`, `status`, `approve` as a user meets them: short output, --run-root everywhere,
one-line errors, nothing written outside the run root. (What a whole `tumorflow run` prints is
tested on the run of tests/pipelines/test_pipeline_e2e.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tumorflow.cli.main import build_parser, main


def _user_env() -> dict[str, str]:
    """The environment of a user who has set no log level."""
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`tumorflow ARGV` as a user runs it: a fresh interpreter, no log level set beforehand."""
    env = _user_env()
    return subprocess.run(
        [sys.executable, "-m", "tumorflow.cli.main", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["compile"],
        ["submit", "--host", "http://kfp"],
        ["approve", "r1"],
        ["reject", "r1", "--reason", "x"],
        ["status"],
        ["rollback"],
        ["promote"],
        ["monitor", "--current", "c"],
    ],
)
def test_every_command_that_reads_or_writes_a_run_takes_run_root(command: list[str]) -> None:
    args = build_parser().parse_args([*command, "--run-root", "elsewhere"])
    assert args.run_root == "elsewhere"


def test_help_states_the_flag_rule(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "kebab-case" in out and "--model_config_file" in out and "--run-root" in out


def test_drift_ingest_takes_both_spellings_of_its_model_flags() -> None:
    parser = build_parser()
    for spelling in ("--model-name", "--model_name"):
        args = parser.parse_args(["drift-ingest", "--store", "s", "--images", "d", spelling, "m"])
        assert args.model_name == "m"


@pytest.mark.parametrize(
    ("command", "flag", "source"),
    [("run", "--dataset", "missing-scans"), ("monitor", "--current", "missing-requests")],
)
def test_a_missing_local_source_fails_before_the_pipeline_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str, flag: str, source: str
) -> None:
    root = tmp_path / "runs"
    code = main([command, flag, str(tmp_path / source), "--run-root", str(root)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (
        f"tumorflow {command}: error: {flag} {tmp_path / source}: no such file or folder"
    )
    assert not (root / "pipeline_root").exists()


def test_monitoring_is_one_command():
    """`tumorflow monitor` runs the monitoring pipeline; `run` no longer has a second way in."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--monitor", "requests"])
    args = build_parser().parse_args(["monitor", "--current", "r", "--no-cache"])
    assert (args.current, args.no_cache, args.summary_json) == ("r", True, None)


def test_status_of_a_fresh_folder_says_no_runs_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "fresh"
    assert main(["status", "--run-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "no runs yet" in out and "no versions" in out
    assert not root.exists()


@pytest.mark.parametrize("command", [["approve", "r1"], ["rollback"], ["promote"]])
def test_commands_that_need_a_run_say_there_is_none(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: list[str]
) -> None:
    root = tmp_path / "fresh"
    assert main([*command, "--run-root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tumorflow {command[0]}: error: no runs yet: ")
    assert "--run-root" in err and len(err.splitlines()) == 1
    assert not (root / "mlflow.db").exists()


@pytest.mark.e2e
def test_tensorflow_start_up_lines_are_hidden_unless_verbose(tmp_path: Path) -> None:
    # a command that loads TensorFlow (Keras' backbones); validate no longer does
    quiet = _cli("weights", "list", cwd=tmp_path)
    verbose = _cli("-v", "weights", "list", cwd=tmp_path)
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr[-2000:]
    native = ("cuInit", "oneDNN", "absl::InitializeLog", "cpu_feature_guard")
    assert not any(marker in quiet.stderr + quiet.stdout for marker in native)
    assert any(marker in verbose.stderr for marker in native)
    assert "mobilenetv2" in quiet.stdout


@pytest.mark.e2e
def test_a_failing_task_is_one_line_naming_the_task_and_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A folder that exists but is not laid out as the preset expects fails inside the pipeline:
    one line names the task, the exception its output ended with, and the run log."""
    (tmp_path / "scans" / "tumor").mkdir(parents=True)
    code = main(["run", "--dataset", str(tmp_path / "scans"), "--run-root", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # the first task to read the folder is the one that fingerprints it
    assert err[-2].split() == ["dataset-version", "FAILED"]
    assert err[-1].startswith("tumorflow run: error: task dataset-version failed: DatasetError: ")
    assert "has no folder" in err[-1] and str(tmp_path / "r" / "logs") in err[-1]
    assert "Traceback" not in "\n".join(err)
