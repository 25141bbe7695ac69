"""The image built from infra/Dockerfile runs the compiled pipeline's own command lines for the
dataset version, download, validate-and-split and a one-epoch train, as the Kubeflow / Vertex AI
launcher runs them: the executor input JSON on the command line, artifacts under a /gcs/BUCKET
mount (how Vertex AI's gcsfuse presents gs:// URIs), as the image's non-root user. And
`tumorflow run --runner docker` runs the whole DAG in it through a Docker API (docker's, or
podman's: infra/podman-docker-api.sh).

The tests that build are marked `image`; `make test` leaves them out. They are skipped
where no container engine works. `pytest -m image tests/infra/test_image.py` runs them from
nothing: the base image's stand-in (infra/base-standin.sh) where no registry answers, the build
(the engine's layer cache reuses the dependency layers while only the code changed), the steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import TINY_CONFIG, wait_until

from tumorflow.core.config import PipelineConfig
from tumorflow.pipelines.runner import compile_pipeline

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/tumorflow-python:test"
BUCKET = "bucket"
# Where the phantom puts its class folders (the Kaggle kidney CT layout; core/presets/phantom.yaml).
PHANTOM_SUBDIR = (
    "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone/CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
)
STEPS = ("dataset-version", "download", "validate-and-split", "train")
BASE = "docker.io/library/python:3.11-slim"  # the Dockerfile's FROM
# buildah's RUN steps and `buildah run` with chroot isolation: they work where no OCI runtime
# does (this project's machines: crun refuses hybrid cgroups, rlimits cannot be raised).
BUILDAH_ENV = {"BUILDAH_ISOLATION": "chroot"}


def _engine() -> str | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "info"], capture_output=True, check=False).returncode == 0
    ):
        return "docker"
    if shutil.which("buildah") and os.geteuid() == 0:
        return "buildah"
    return None


@pytest.fixture(scope="module")
def engine() -> str:
    found = _engine()
    if found is None:
        pytest.skip(
            "no container engine: neither docker with a running daemon nor buildah run as root"
        )
    return found


@pytest.fixture(scope="module")
def image(engine) -> str:
    """The production target, built now; the engine's layer cache keeps the dependency layers
    (minutes) while only the code changed. Without a registry the base is a local stand-in."""
    env = {**os.environ, **BUILDAH_ENV}
    if engine == "buildah":
        subprocess.run(["sh", "infra/base-standin.sh", BASE], cwd=ROOT, env=env, check=True)
        build = ["buildah", "bud", "--layers"]
    else:
        build = ["docker", "build"]
    started = time.monotonic()
    target = ["-f", "infra/Dockerfile", "--target", "production", "-t", IMAGE]
    subprocess.run(
        [*build, "--network", "host", *target, "."],
        cwd=ROOT,
        env=env,
        check=True,
    )
    print(f"image built in {time.monotonic() - started:.0f} s")
    return IMAGE


def _run_in_image(engine: str, image: str, gcs: Path, command: list[str]) -> str:
    options = ["--network", "host", "-v", f"{gcs}:/gcs", "--user", "1000"]
    if engine == "docker":
        argv = ["docker", "run", "--rm", *options, image, *command]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    else:
        container = subprocess.run(
            ["buildah", "from", image], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            argv = ["buildah", "run", *options, container, "--", *command]
            env = {**os.environ, **BUILDAH_ENV}
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _executor_input(
    name: str, task: dict, component: dict, run: str, outputs: dict, defaults: dict
) -> dict:
    """What the launcher passes as `{{$}}`: the task's inputs resolved, its outputs placed."""
    parameters, artifacts = {}, {}
    for key, spec in task.get("inputs", {}).get("parameters", {}).items():
        if "componentInputParameter" in spec:
            parameters[key] = defaults[spec["componentInputParameter"]]
        elif "runtimeValue" in spec:
            parameters[key] = spec["runtimeValue"]["constant"]
        else:
            producer = spec["taskOutputParameter"]
            parameters[key] = outputs[producer["producerTask"]]["parameters"][
                producer["outputParameterKey"]
            ]
    for key, spec in task.get("inputs", {}).get("artifacts", {}).items():
        producer = spec["taskOutputArtifact"]
        artifacts[key] = {
            "artifacts": outputs[producer["producerTask"]]["artifacts"][
                producer["outputArtifactKey"]
            ]
        }
    base = f"{run}/{name}"
    output_spec = component.get("outputDefinitions", {})
    return {
        "inputs": {"parameterValues": parameters, "artifacts": artifacts},
        "outputs": {
            "artifacts": {
                key: {
                    "artifacts": [
                        {
                            "name": key,
                            "type": {"schemaTitle": spec["artifactType"]["schemaTitle"]},
                            "uri": f"gs://{BUCKET}/{base}/{key}",
                            "metadata": {},
                        }
                    ]
                }
                for key, spec in output_spec.get("artifacts", {}).items()
            },
            "parameters": {
                key: {"outputFile": f"/gcs/{BUCKET}/{base}/{key}"}
                for key in output_spec.get("parameters", {})
            },
            "outputFile": f"/gcs/{BUCKET}/{base}/executor_output.json",
        },
    }


def _recorded_outputs(gcs: Path, run: str, name: str, executor_input: dict) -> dict:
    """The task's outputs as the next tasks see them (artifact metadata from executor_output)."""
    base = gcs / BUCKET / run / name
    written = json.loads((base / "executor_output.json").read_text())
    artifacts = {}
    for key, value in executor_input["outputs"]["artifacts"].items():
        (artifact,) = value["artifacts"]
        metadata = written.get("artifacts", {}).get(key, {}).get("artifacts", [{}])[0]
        artifacts[key] = [{**artifact, "metadata": metadata.get("metadata", {})}]
    parameters = dict(written.get("parameterValues", {}))
    for key in executor_input["outputs"]["parameters"]:
        path = base / key
        if key not in parameters and path.exists():
            parameters[key] = path.read_text()
    return {"artifacts": artifacts, "parameters": parameters}


@pytest.mark.image
def test_compiled_steps_run_in_the_image_as_the_launcher_runs_them(engine, image, tmp_path):
    config = PipelineConfig.model_validate(
        {
            "dataset": {
                "source": "phantom",
                "subdir": PHANTOM_SUBDIR,
                "phantom": {"per_class": 24, "size": 48},
            },
            "train": {
                "image_size": 32,
                "batch_size": 8,
                "stage1": {"epochs": 1},
                "stage2": {"epochs": 0},
            },
            "runtime": {"image": image, "bucket": f"gs://{BUCKET}"},
        }
    )
    spec = yaml.safe_load(
        compile_pipeline(tmp_path / "pipeline.yaml", config=config, no_registry=True).read_text()
    )
    defaults = {
        name: value.get("defaultValue")
        for name, value in spec["root"]["inputDefinitions"]["parameters"].items()
    }
    gcs = tmp_path / "gcs"
    (gcs / BUCKET).mkdir(parents=True)
    gcs.chmod(0o777)
    (gcs / BUCKET).chmod(0o777)
    tasks, outputs, printed = spec["root"]["dag"]["tasks"], {}, {}
    for name in STEPS:
        task = tasks[name]
        component = spec["components"][task["componentRef"]["name"]]
        container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        assert container["image"] == image
        executor_input = _executor_input(name, task, component, "run-1", outputs, defaults)
        args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
        printed[name] = _run_in_image(engine, image, gcs, [*container["command"], *args])
        outputs[name] = _recorded_outputs(gcs, "run-1", name, executor_input)
    run = gcs / BUCKET / "run-1"
    assert (run / "download" / "raw" / "manifest.csv").exists()
    assert (run / "validate-and-split" / "split" / "split_manifest.json").exists()
    model = run / "train" / "model"
    assert (model / "model.keras").exists() and (model / "model_info.json").exists()
    assert json.loads((model / "model_info.json").read_text())["epochs_run"]["stage1"] == 1
    for name, text in printed.items():
        print(f"--- {name}\n{text[-2000:]}")


# A DAG small enough for a container per task on two cores: the suite's tiny run.
TINY_RUN = ["--preset", "phantom", "--config", str(TINY_CONFIG)]
# Every task of the retraining DAG, the drift report beside the deploy included.
DAG = {"dataset-version", "download", "validate-and-split", "train", "evaluate", "gate"}
DAG |= {"approval", "deploy", "drift-report"}


def _tumorflow(*argv: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`tumorflow ARGV` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "tumorflow.cli.main", *argv],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1800,
    )


def test_run_with_docker_runner_and_no_docker_api_fails_in_one_line(tmp_path):
    socket = tmp_path / "nothing-listens.sock"
    done = _tumorflow(
        "run",
        "--runner",
        "docker",
        "--run-root",
        str(tmp_path / "runs"),
        cwd=tmp_path,
        env={"DOCKER_HOST": f"unix://{socket}"},
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tumorflow run: error: --runner docker: no Docker API answers at ")
    assert f"unix://{socket}" in line and "podman system service" in line
    assert not (tmp_path / "runs" / "pipeline_root").exists()  # no task was started


def test_run_image_without_docker_runner_is_refused(tmp_path):
    done = _tumorflow("run", "--image", "some/image:1", cwd=tmp_path, env={})
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "tumorflow run: error: --image names the image of --runner docker (the tasks' container)"
    )


@pytest.fixture(scope="module")
def docker_host(engine, tmp_path_factory) -> Iterator[str]:
    """A Docker API that sees the built image: docker's own, or podman's served for this module
    (podman and buildah share the local image store)."""
    if engine == "docker":
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    if shutil.which("podman") is None:
        pytest.skip("no Docker API: no docker daemon and no podman to serve one")
    socket = tmp_path_factory.mktemp("podman") / "docker.sock"
    log = (socket.parent / "service.log").open("w")
    service = subprocess.Popen(
        ["sh", "infra/podman-docker-api.sh", f"unix://{socket}"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(socket.exists, 30, "podman's Docker API socket", interval=0.2)
        yield f"unix://{socket}"
    finally:
        service.terminate()
        service.wait(timeout=30)
        log.close()


@pytest.mark.image
def test_run_with_docker_runner_runs_every_task_in_the_image(image, docker_host, tmp_path):
    run_root = tmp_path / "runs"
    missing = _tumorflow(
        "run",
        "--runner",
        "docker",
        "--image",
        "localhost/tumorflow-python:no-such-tag",
        "--run-root",
        str(run_root),
        cwd=tmp_path,
        env={"DOCKER_HOST": docker_host},
    )
    assert missing.returncode == 2
    (line,) = missing.stderr.strip().splitlines()
    assert "image localhost/tumorflow-python:no-such-tag is not in the engine" in line

    done = _tumorflow(
        "run",
        "--runner",
        "docker",
        "--image",
        image,
        "--run-root",
        str(run_root),
        "--summary-json",
        str(tmp_path / "summary.json"),
        *TINY_RUN,
        cwd=tmp_path,
        env={"DOCKER_HOST": docker_host},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["task_seconds"]) == DAG
    assert summary["deployed_version"] == 1
    assert list(Path(summary["model_base_path"]).glob("*/1/saved_model.pb"))
    # Each task ran in a container of the image (kfp.local's DockerRunner names it per task).
    run_log = Path(summary["log_path"]).read_text()
    assert run_log.count(f"Found image '{image}'") == len(DAG)
    print(done.stdout[-3000:], done.stderr[-3000:])
