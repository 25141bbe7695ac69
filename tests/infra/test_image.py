"""The image built from infra/Dockerfile runs the compiled pipeline's own command lines for the
dataset version, download, validate-and-split and a one-epoch train, as the Kubeflow / Vertex AI
launcher runs them: the executor input JSON on the command line, artifacts under a /gcs/BUCKET
mount (how Vertex AI's gcsfuse presents gs:// URIs), as the image's non-root user.

Marked `image` (and slow); `make test` leaves it out. Skipped where no container engine works."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tumorflow.core.config import PipelineConfig
from tumorflow.pipelines.runner import compile_pipeline

pytestmark = [pytest.mark.image, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/tumorflow-python:test"
BUCKET = "bucket"
# Where the phantom puts its class folders (the Kaggle kidney CT layout; core/presets/phantom.yaml).
PHANTOM_SUBDIR = (
    "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone/CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
)
STEPS = ("dataset-version", "download", "validate-and-split", "train")


def _engine() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "info"], capture_output=True, check=False).returncode == 0
    ):
        return ["docker"]
    for name in ("buildah", "podman"):
        if shutil.which(name):
            return [name]
    return None


@pytest.fixture(scope="module")
def engine() -> list[str]:
    found = _engine()
    if found is None:
        pytest.skip("no container engine: docker (with a running daemon), podman or buildah")
    return found


@pytest.fixture(scope="module")
def image(engine) -> str:
    build = ["bud"] if engine[0] == "buildah" else ["build"]
    started = time.monotonic()
    subprocess.run(
        [
            *engine,
            *build,
            "--network",
            "host",
            "-f",
            "infra/Dockerfile",
            "--target",
            "production",
            "-t",
            IMAGE,
            ".",
        ],
        cwd=ROOT,
        check=True,
    )
    print(f"image built in {time.monotonic() - started:.0f} s")
    return IMAGE


def _run_in_image(engine: list[str], image: str, gcs: Path, command: list[str]) -> str:
    if engine[0] == "buildah":
        container = subprocess.run(
            ["buildah", "from", image], capture_output=True, text=True, check=True
        ).stdout.strip()
        argv = [
            "buildah",
            "run",
            "--network",
            "host",
            "-v",
            f"{gcs}:/gcs",
            "--user",
            "1000",
            container,
            "--",
            *command,
        ]
    else:
        argv = [
            *engine,
            "run",
            "--rm",
            "--network",
            "host",
            "-v",
            f"{gcs}:/gcs",
            "--user",
            "1000",
            image,
            *command,
        ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
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
