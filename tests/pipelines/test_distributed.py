"""The compiled training task: a GPU task with the GKE GPU pool's node selector and toleration,
or with `runtime.workers > 1` a Vertex AI custom job with worker pools."""

from pathlib import Path

import yaml
from kfp import compiler, dsl

from tumorflow.core.config import PipelineConfig, RuntimeConfig
from tumorflow.pipelines import distributed, steps
from tumorflow.pipelines.pipeline import pipeline_parameters


def _compiled(runtime: RuntimeConfig, tmp_path: Path) -> dict:
    defaults = pipeline_parameters(PipelineConfig(), local=False, no_registry=True)

    @dsl.pipeline(name="train-only")
    def train_only(split_uri: str = "gs://b/split"):
        split = dsl.importer(
            artifact_uri=split_uri, artifact_class=dsl.Dataset, reimport=False
        ).output
        # What the compiled pipeline's run parameters default to for this runtime.
        p = runtime.model_dump(include={"accelerator_type", "accelerator_count"})
        p |= runtime.model_dump(include={"train_cpu", "train_memory"})
        distributed.train_task(
            steps.train,
            runtime,
            p,
            split=split,
            train_config=defaults["train_config"],
            checkpoint_root="/gcs/b/checkpoints",
            tracking_uri="",
            experiment="tumorflow",
        )

    path = tmp_path / "train.yaml"
    compiler.Compiler().compile(train_only, str(path))
    return list(yaml.safe_load_all(path.read_text()))


def test_one_worker_is_a_gpu_task_on_the_gpu_node_pool(tmp_path):
    runtime = RuntimeConfig(
        accelerator_type="NVIDIA_TESLA_T4", accelerator_count=2, gke_gpu_pool=True
    )
    pipeline_spec, platform = _compiled(runtime, tmp_path)
    executor = pipeline_spec["deploymentSpec"]["executors"]["exec-train"]
    resources = executor["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "2"
    assert resources["accelerator"]["resourceType"] == "NVIDIA_TESLA_T4"
    kubernetes = next(
        iter(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values())
    )
    assert kubernetes["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"
    }
    assert kubernetes["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
    ]


def test_several_workers_are_a_vertex_custom_job_with_worker_pools(tmp_path):
    runtime = RuntimeConfig(
        workers=3,
        machine_type="a2-highgpu-2g",
        accelerator_type="NVIDIA_TESLA_A100",
        accelerator_count=2,
    )
    (pipeline_spec,) = _compiled(runtime, tmp_path)
    executor = pipeline_spec["deploymentSpec"]["executors"]["exec-train"]
    assert "CustomJob" in executor["container"]["args"]
    task = pipeline_spec["root"]["dag"]["tasks"]["train"]
    parameters = task["inputs"]["parameters"]
    component = pipeline_spec["components"]["comp-train"]
    defaults = component["inputDefinitions"]["parameters"]
    pools = defaults["worker_pool_specs"]["defaultValue"]
    assert [pool["replica_count"] for pool in pools] == [1, 2]
    for pool in pools:
        assert pool["machine_spec"] == {
            "machine_type": "a2-highgpu-2g",
            "accelerator_type": "NVIDIA_TESLA_A100",
            "accelerator_count": 2,
        }
        container = pool["container_spec"]
        assert container["image_uri"] == steps.PROJECT_IMAGE
        assert "def train(" in container["command"][-1]
        assert container["args"][-2:] == ["--function_to_execute", "train"]
    assert "train_config" in parameters and "split" in task["inputs"]["artifacts"]


def test_workers_and_machine_type_are_not_run_parameters():
    parameters = pipeline_parameters(PipelineConfig(), local=False, no_registry=True)
    assert not {"workers", "machine_type", "gke_gpu_pool"} & set(parameters)
    assert parameters["accelerator_count"] == 1


def test_compile_lays_the_training_out_as_the_config_says(tmp_path):
    from tumorflow.pipelines.runner import compile_pipeline

    config = PipelineConfig.model_validate(
        {"runtime": {"workers": 2, "image": "example.com/tumorflow-python:1"}}
    )
    spec = yaml.safe_load(
        compile_pipeline(tmp_path / "p.yaml", config=config, no_registry=True).read_text()
    )
    train = spec["components"]["comp-train"]["inputDefinitions"]["parameters"]
    pools = train["worker_pool_specs"]["defaultValue"]
    assert [pool["replica_count"] for pool in pools] == [1, 1]
    assert pools[0]["machine_spec"]["machine_type"] == "g2-standard-8"
    assert {pool["container_spec"]["image_uri"] for pool in pools} == {
        "example.com/tumorflow-python:1"
    }
    evaluate = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]
    assert evaluate["image"] == "example.com/tumorflow-python:1"

    default = compile_pipeline(tmp_path / "d.yaml", no_registry=True).read_text()
    assert "worker_pool_specs" not in default and "nodeSelector" not in default
