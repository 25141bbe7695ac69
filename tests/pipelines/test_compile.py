"""The compiled pipeline spec is what Kubeflow / Vertex AI receive: parse it back and check the DAG."""

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from tumorflow.pipelines.runner import compile_pipeline


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> pipeline_spec_pb2.PipelineSpec:
    path = compile_pipeline(
        tmp_path_factory.mktemp("compiled") / "pipeline.yaml",
        image="registry.example/tumorflow-python:1.2.3",
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
        "download",
        "validate-and-split",
        "train",
        "evaluate",
        "gate",
        "approval",
        "drift-reference",
        "drift-report",
        "condition-1",
    }
    assert set(tasks["validate-and-split"].dependent_tasks) == {"download"}
    assert set(tasks["train"].dependent_tasks) == {"validate-and-split"}
    assert set(tasks["evaluate"].dependent_tasks) == {"train", "validate-and-split"}
    assert "evaluate" in tasks["gate"].dependent_tasks
    assert "gate" in tasks["approval"].dependent_tasks


def test_deploy_runs_only_inside_the_approval_condition(spec):
    condition = _tasks(spec)["condition-1"]
    assert condition.trigger_policy.condition == (
        "inputs.parameter_values['pipelinechannel--approval-Output'] == true"
    )
    assert set(_tasks(spec, condition.component_ref.name)) == {"deploy"}
    assert "deploy" not in _tasks(spec)


def test_training_requests_the_accelerator_from_pipeline_parameters(spec):
    executor = spec.deployment_spec["executors"]["exec-train"]
    resources = executor["container"]["resources"]
    assert "accelerator_type" in resources["accelerator"]["resourceType"]
    assert "accelerator_count" in resources["accelerator"]["resourceCount"]
    parameters = spec.root.input_definitions.parameters
    assert parameters["accelerator_type"].default_value.string_value == "NVIDIA_L4"
    for name in ("source", "train_config", "gate_config", "split_config", "model_base_path"):
        assert name in parameters


def test_every_step_runs_in_the_one_project_image(spec):
    images = {
        name: executor["container"]["image"]
        for name, executor in spec.deployment_spec["executors"].items()
    }
    assert set(images.values()) == {"registry.example/tumorflow-python:1.2.3"}


def test_side_effect_steps_are_never_cached(spec):
    tasks = _tasks(spec)
    for name in ("gate", "approval", "drift-report"):
        assert not tasks[name].caching_options.enable_cache, name
    deploy = _tasks(spec, tasks["condition-1"].component_ref.name)["deploy"]
    assert not deploy.caching_options.enable_cache
    assert tasks["train"].caching_options.enable_cache


def test_compile_command_writes_the_spec(tmp_path: Path, capsys):
    output = tmp_path / "out" / "pipeline.yaml"
    from tumorflow.cli.main import main

    assert main(["compile", "--output", str(output), "--no-registry"]) == 0
    assert output.exists()
    assert "wrote" in capsys.readouterr().out


def test_the_monitoring_pipeline_retrains_only_when_drifted(tmp_path: Path):
    path = compile_pipeline(tmp_path / "monitor.yaml", pipeline="monitor")
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
    retrain = spec.components[nested["tumorflow-retrain"].component_ref.name].dag.tasks
    assert {"train", "gate", "approval", "condition-1"} <= set(retrain)
    assert "current_source" in spec.root.input_definitions.parameters


def test_a_preset_becomes_the_parameters_defaults(tmp_path: Path):
    from tumorflow.core.config import load_config

    config = load_config(preset="brain_mri", overrides=["runtime.accelerator_type=NVIDIA_A100"])
    path = compile_pipeline(tmp_path / "brain.yaml", config=config)
    spec = json_format.ParseDict(yaml.safe_load(path.read_text()), pipeline_spec_pb2.PipelineSpec())
    parameters = spec.root.input_definitions.parameters
    assert parameters["source"].default_value.string_value.startswith(
        "kaggle:masoudnickparvar/brain-tumor-mri-dataset"
    )
    train = parameters["train_config"].default_value.struct_value
    assert train["backbone"] == "resnet50v2" and train["augment"]["flip_vertical"] is False
    assert parameters["accelerator_type"].default_value.string_value == "NVIDIA_A100"
