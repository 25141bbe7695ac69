"""The compiled pipeline spec is what Kubeflow / Vertex AI receive: parse it back and check the DAG."""

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from tumorflow.core.config import PipelineConfig, load_config
from tumorflow.core.errors import ConfigError
from tumorflow.pipelines.pipeline import NOT_PARAMETERS
from tumorflow.pipelines.runner import compile_pipeline

MLFLOW = "tracking.tracking_uri=http://mlflow.example:5000"


def _cluster_config(*overrides: str) -> PipelineConfig:
    return load_config(overrides=[MLFLOW, *overrides])


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> pipeline_spec_pb2.PipelineSpec:
    path = compile_pipeline(
        tmp_path_factory.mktemp("compiled") / "pipeline.yaml",
        config=_cluster_config("runtime.image=registry.example/tumorflow-python:1.2.3"),
    )
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1
    return json_format.ParseDict(documents[0], pipeline_spec_pb2.PipelineSpec())


def _tasks(spec, component: str = "root"):
    dag = spec.root.dag if component == "root" else spec.components[component].dag
    return dag.tasks


def test_every_step_is_a_task_wired_in_data_order(spec):
    tasks = _tasks(spec)
    assert set(tasks) >= {
        "dataset-version",
        "download",
        "validate-and-split",
        "train",
        "evaluate",
        "gate",
        "approval",
        "drift-report",
        "condition-1",
    }
    assert set(tasks["download"].dependent_tasks) == {"dataset-version"}
    assert set(tasks["validate-and-split"].dependent_tasks) == {"download"}
    assert set(tasks["train"].dependent_tasks) == {"validate-and-split"}
    assert set(tasks["evaluate"].dependent_tasks) == {
        "train",
        "validate-and-split",
        "external-sets",
    }
    assert "evaluate" in tasks["gate"].dependent_tasks
    assert "gate" in tasks["approval"].dependent_tasks
    # the drift report is against the champion: done before the gate, so before any deploy
    assert "drift-report" in tasks["gate"].dependent_tasks


def test_external_sets_are_prepared_on_their_own_versions_and_never_trained_on(spec):
    tasks = _tasks(spec)
    assert set(tasks["external-sets"].dependent_tasks) == {"external-versions"}
    # the version step looks at the sources now; the preparing step is cached on what it found
    assert not tasks["external-versions"].caching_options.enable_cache
    assert tasks["external-sets"].caching_options.enable_cache
    inputs = tasks["external-sets"].inputs.parameters
    assert inputs["versions"].task_output_parameter.producer_task == "external-versions"
    assert inputs["sets"].task_output_parameter.producer_task == "external-versions"
    assert "external-sets" not in tasks["train"].dependent_tasks
    assert {"external-sets", "evaluate"} <= set(tasks["gate"].dependent_tasks)


def test_deploy_runs_only_inside_the_approval_condition(spec):
    condition = _tasks(spec)["condition-1"]
    assert condition.trigger_policy.condition == (
        "inputs.parameter_values['pipelinechannel--approval-Output'] == true"
    )
    assert set(_tasks(spec, condition.component_ref.name)) == {"deploy"}
    assert "deploy" not in _tasks(spec)
    # deploy stores the drift reference evaluate built with the model it deploys
    reference = condition.inputs.artifacts["pipelinechannel--evaluate-reference"]
    assert reference.task_output_artifact.producer_task == "evaluate"
    assert reference.task_output_artifact.output_artifact_key == "reference"


def test_training_requests_the_accelerator_from_pipeline_parameters(spec):
    executor = spec.deployment_spec["executors"]["exec-train"]
    resources = executor["container"]["resources"]
    assert "accelerator_type" in resources["accelerator"]["resourceType"]
    assert "accelerator_count" in resources["accelerator"]["resourceCount"]
    parameters = spec.root.input_definitions.parameters
    assert parameters["accelerator_type"].default_value.string_value == "NVIDIA_L4"


def test_the_parameters_are_the_config_model_once(spec):
    """Every config field reaches the pipeline exactly once: four sections whole, the others
    field by field; nothing is a second copy of a section's field (no `source`, no `classes`)."""
    parameters = set(spec.root.input_definitions.parameters)
    config = PipelineConfig()
    assert {"dataset", "split_config", "train_config", "gate_config"} <= parameters
    for section in ("deploy", "tracking", "drift", "runtime"):
        for field in getattr(config, section).model_fields:
            if f"{section}.{field}" not in NOT_PARAMETERS:
                assert field in parameters, f"{section}.{field}"
    assert not {"source", "classes", "image", "bucket", "target"} & parameters
    defaults = spec.root.input_definitions.parameters
    assert defaults["model_base_path"].default_value.string_value == "gs://tumorflow-models/serving"
    assert defaults["checkpoint_root"].default_value.string_value == (
        "/gcs/tumorflow-models/checkpoints"
    )
    assert defaults["tracking_uri"].default_value.string_value == "http://mlflow.example:5000"


def test_the_cluster_defaults_follow_the_configured_bucket(tmp_path: Path):
    path = compile_pipeline(
        tmp_path / "p.yaml", config=_cluster_config("runtime.bucket=gs://hospital-ml")
    )
    defaults = yaml.safe_load(path.read_text())["root"]["inputDefinitions"]["parameters"]
    assert defaults["model_base_path"]["defaultValue"] == "gs://hospital-ml/serving"
    assert defaults["checkpoint_root"]["defaultValue"] == "/gcs/hospital-ml/checkpoints"


def test_the_approval_report_links_to_the_configured_console(tmp_path: Path):
    path = compile_pipeline(
        tmp_path / "p.yaml",
        config=_cluster_config("console.base_url=https://review.hospital.example/tumorflow"),
    )
    compiled = yaml.safe_load(path.read_text())
    defaults = compiled["root"]["inputDefinitions"]["parameters"]
    assert defaults["console_base_url"]["defaultValue"] == (
        "https://review.hospital.example/tumorflow"
    )
    approval = compiled["root"]["dag"]["tasks"]["approval"]
    assert approval["inputs"]["parameters"]["console_base_url"] == {
        "componentInputParameter": "console_base_url"
    }


def test_a_cluster_pipeline_without_a_registry_is_refused_unless_told(tmp_path: Path):
    with pytest.raises(ConfigError, match="--no-registry"):
        compile_pipeline(tmp_path / "p.yaml", config=PipelineConfig())
    with pytest.raises(ConfigError, match="a file on this machine"):
        compile_pipeline(
            tmp_path / "p.yaml",
            config=load_config(overrides=["tracking.tracking_uri=sqlite:///x.db"]),
        )
    path = compile_pipeline(tmp_path / "p.yaml", config=PipelineConfig(), no_registry=True)
    defaults = yaml.safe_load(path.read_text())["root"]["inputDefinitions"]["parameters"]
    assert defaults["tracking_uri"]["defaultValue"] == ""


def test_every_step_runs_in_the_one_project_image(spec):
    images = {
        name: executor["container"]["image"]
        for name, executor in spec.deployment_spec["executors"].items()
    }
    assert set(images.values()) == {"registry.example/tumorflow-python:1.2.3"}


def test_side_effect_steps_are_never_cached(spec):
    tasks = _tasks(spec)
    for name in ("dataset-version", "gate", "approval", "drift-report"):
        assert not tasks[name].caching_options.enable_cache, name
    deploy = _tasks(spec, tasks["condition-1"].component_ref.name)["deploy"]
    assert not deploy.caching_options.enable_cache
    for name in ("download", "validate-and-split", "train", "evaluate"):
        assert tasks[name].caching_options.enable_cache, name


def test_cached_steps_are_keyed_on_the_dataset_version_and_nothing_per_run(spec):
    """A cached step's inputs are its cache key on Kubeflow and Vertex: the download is keyed on
    the fingerprint the uncached version step resolves, and no cached step takes the run name."""
    tasks = _tasks(spec)
    download = tasks["download"].inputs.parameters
    assert download["fingerprint"].task_output_parameter.producer_task == "dataset-version"
    assert download["fingerprint"].task_output_parameter.output_parameter_key == "fingerprint"
    for name, task in tasks.items():
        if not task.caching_options.enable_cache:
            continue
        for value in task.inputs.parameters.values():
            text = json_format.MessageToJson(value)
            assert "PIPELINE_JOB_NAME" not in text and "pipeline_job_name" not in text, name


def test_compile_command_writes_the_spec(tmp_path: Path, capsys):
    output = tmp_path / "out" / "pipeline.yaml"
    from tumorflow.cli.main import main

    assert main(["compile", "--output", str(output)]) == 2
    assert "--no-registry" in capsys.readouterr().err
    assert not output.exists()
    assert main(["compile", "--output", str(output), "--set", MLFLOW]) == 0
    assert output.exists()
    assert "wrote" in capsys.readouterr().out


def test_the_monitoring_pipeline_retrains_only_when_drifted(tmp_path: Path):
    path = compile_pipeline(tmp_path / "monitor.yaml", config=_cluster_config(), pipeline="monitor")
    spec = json_format.ParseDict(yaml.safe_load(path.read_text()), pipeline_spec_pb2.PipelineSpec())
    tasks = spec.root.dag.tasks
    assert set(tasks) == {"drift-check", "condition-1"}
    condition = tasks["condition-1"]
    assert "drift-check" in condition.dependent_tasks
    assert condition.trigger_policy.condition == (
        "inputs.parameter_values['pipelinechannel--drift-check-Output'] == true"
    )
    nested = spec.components[condition.component_ref.name].dag.tasks
    assert set(nested) == {"tumorflow-retrain"}
    # the drift check's reason is the retraining run's trigger_reason parameter
    reason = nested["tumorflow-retrain"].inputs.parameters["trigger_reason"]
    assert reason.component_input_parameter == "pipelinechannel--drift-check-reason"
    into_condition = condition.inputs.parameters["pipelinechannel--drift-check-reason"]
    assert into_condition.task_output_parameter.producer_task == "drift-check"
    assert into_condition.task_output_parameter.output_parameter_key == "reason"
    retrain = spec.components[nested["tumorflow-retrain"].component_ref.name].dag.tasks
    assert {"train", "gate", "approval", "condition-1"} <= set(retrain)
    assert "current_source" in spec.root.input_definitions.parameters


def test_a_preset_becomes_the_parameters_defaults(tmp_path: Path):
    config = load_config(
        preset="brain_mri", overrides=["runtime.accelerator_type=NVIDIA_A100", MLFLOW]
    )
    path = compile_pipeline(tmp_path / "brain.yaml", config=config)
    spec = json_format.ParseDict(yaml.safe_load(path.read_text()), pipeline_spec_pb2.PipelineSpec())
    parameters = spec.root.input_definitions.parameters
    assert (
        parameters["dataset"]
        .default_value.struct_value["source"]
        .startswith("kaggle:masoudnickparvar/brain-tumor-mri-dataset")
    )
    train = parameters["train_config"].default_value.struct_value
    assert train["backbone"] == "resnet50v2" and train["augment"]["flip_vertical"] is False
    assert parameters["accelerator_type"].default_value.string_value == "NVIDIA_A100"


def test_kubeflow_mounts_the_release_secrets_into_approval_and_deploy_only(tmp_path: Path):
    """On Kubeflow the trust root and the pipeline's key come from Kubernetes Secrets, mounted
    read-only into the two pods that sign and verify, and the run parameters name those files."""
    path = compile_pipeline(
        tmp_path / "p.yaml",
        config=_cluster_config(
            "runtime.target=kubeflow",
            "runtime.trust_root_secret=tumorflow-trust-root",
            "runtime.pipeline_key_secret=tumorflow-pipeline-key",
        ),
    )
    pipeline_doc, platform = list(yaml.safe_load_all(path.read_text()))
    defaults = pipeline_doc["root"]["inputDefinitions"]["parameters"]
    assert defaults["trust_root"]["defaultValue"] == "/etc/tumorflow/trust-root/trust_root.yaml"
    assert defaults["pipeline_key"]["defaultValue"] == "/etc/tumorflow/pipeline-key/pipeline"
    assert "trust_root_secret" not in defaults and "pipeline_key_secret" not in defaults
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {
        name: {(s["secretName"], s["mountPath"]) for s in executor.get("secretAsVolume", [])}
        for name, executor in executors.items()
    }
    expected = {
        ("tumorflow-trust-root", "/etc/tumorflow/trust-root"),
        ("tumorflow-pipeline-key", "/etc/tumorflow/pipeline-key"),
    }
    with_secrets = {name for name, secrets in mounted.items() if secrets}
    assert with_secrets == {"exec-approval", "exec-deploy"}, mounted
    assert all(mounted[name] == expected for name in with_secrets)


def test_vertex_and_unset_secrets_mount_nothing(tmp_path: Path):
    for overrides in (
        ("runtime.trust_root_secret=tumorflow-trust-root",),  # target vertex: no Kubernetes
        ("runtime.target=kubeflow",),
    ):
        path = compile_pipeline(tmp_path / "p.yaml", config=_cluster_config(*overrides))
        assert "secretAsVolume" not in path.read_text()
