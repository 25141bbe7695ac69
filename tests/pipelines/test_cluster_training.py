"""The compiled training task: a GPU task with the GKE GPU pool's node selector and toleration,
or with `runtime.workers > 1` a Vertex AI custom job with worker pools."""

from pathlib import Path

import yaml
from kfp import compiler, dsl

from tumorflow.core.config import PipelineConfig, RuntimeConfig
from tumorflow.pipelines import cluster_training, steps
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
        cluster_training.train_task(
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


def _compiled_config(tmp_path: Path, runtime: dict, pipeline: str = "retrain") -> list[dict]:
    from tumorflow.pipelines.runner import compile_pipeline

    config = PipelineConfig.model_validate({"runtime": runtime})
    path = compile_pipeline(
        tmp_path / f"{pipeline}.yaml", config=config, pipeline=pipeline, no_registry=True
    )
    return list(yaml.safe_load_all(path.read_text()))


def _constant(task: dict, name: str):
    return task["inputs"]["parameters"][name]["runtimeValue"]["constant"]


KUBEFLOW_WORKERS = {
    "target": "kubeflow",
    "workers": 3,
    "gke_gpu_pool": True,
    "accelerator_type": "NVIDIA_TESLA_T4",
    "image": "example.com/tumorflow-python:1",
}


def test_several_workers_on_kubeflow_are_a_tfjob_launched_by_the_training_step(tmp_path):
    (spec,) = _compiled_config(tmp_path, KUBEFLOW_WORKERS)
    tasks = spec["root"]["dag"]["tasks"]
    assert "train" not in tasks
    launcher = tasks["train-tfjob"]
    assert launcher["taskInfo"]["name"] == "two-stage fine-tuning"
    assert int(_constant(launcher, "workers")) == 3
    assert _constant(launcher, "image") == "example.com/tumorflow-python:1"
    # each replica runs the training component's own command line
    command, args = _constant(launcher, "command"), _constant(launcher, "args")
    assert "def train(" in command[-1] and "kfp.dsl.executor_main" in command[-2]
    assert args == ["--executor_input", "{{$}}", "--function_to_execute", "train"]
    assert _constant(launcher, "node_selector") == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"
    }
    assert _constant(launcher, "tolerations") == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
    ]
    # the replicas' accelerators, CPU and memory stay run parameters, as for one task
    for name in ("accelerator_count", "train_cpu", "train_memory", "train_config"):
        assert launcher["inputs"]["parameters"][name] == {"componentInputParameter": name}
    assert launcher["inputs"]["artifacts"]["split"]["taskOutputArtifact"]["producerTask"] == (
        "validate-and-split"
    )
    evaluated = tasks["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
    assert evaluated == {"outputArtifactKey": "model", "producerTask": "train-tfjob"}
    # the launcher itself asks for no GPU and runs in the project image like every step
    executors = spec["deploymentSpec"]["executors"]
    assert "resources" not in executors["exec-train-tfjob"]["container"]
    assert {e["container"]["image"] for e in executors.values()} == {
        "example.com/tumorflow-python:1"
    }
    assert "worker_pool_specs" not in yaml.safe_dump(spec)


def test_submit_compiles_for_kubeflow(tmp_path, monkeypatch):
    """`tumorflow submit` goes to a Kubeflow Pipelines endpoint, so multi-worker training is a
    TFJob there even when the config's target is Vertex AI."""
    import kfp

    from tumorflow.pipelines import runner

    submitted = {}

    class Client:
        def __init__(self, host):
            submitted["host"] = host

        def create_run_from_pipeline_package(self, package, **kwargs):
            submitted["spec"] = Path(package).read_text()
            return type("Run", (), {"run_id": "run-1"})()

    monkeypatch.setattr(kfp, "Client", Client)
    config = PipelineConfig.model_validate({"runtime": {"workers": 2}})
    assert runner.submit(config, "http://kfp.example", no_registry=True) == "run-1"
    assert "exec-train-tfjob" in submitted["spec"]
    assert "worker_pool_specs" not in submitted["spec"]


def test_the_monitoring_pipeline_retrains_with_the_configured_layout(tmp_path):
    (kubeflow,) = _compiled_config(tmp_path, KUBEFLOW_WORKERS, pipeline="monitor")
    retrain = kubeflow["components"]["comp-tumorflow-retrain"]["dag"]["tasks"]
    assert int(_constant(retrain["train-tfjob"], "workers")) == 3
    images = {e["container"]["image"] for e in kubeflow["deploymentSpec"]["executors"].values()}
    assert images == {"example.com/tumorflow-python:1"}

    (vertex,) = _compiled_config(tmp_path, {"workers": 2}, pipeline="monitor")
    train = vertex["components"]["comp-train"]["inputDefinitions"]["parameters"]
    pools = train["worker_pool_specs"]["defaultValue"]
    assert [pool["replica_count"] for pool in pools] == [1, 1]
    retrain = vertex["components"]["comp-tumorflow-retrain"]["dag"]["tasks"]
    assert retrain["train"]["componentRef"]["name"] == "comp-train"

    # the default runtime nests today's one-task training
    (default,) = _compiled_config(tmp_path, {}, pipeline="monitor")
    assert "exec-train" in default["deploymentSpec"]["executors"]
    assert "worker_pool_specs" not in yaml.safe_dump(default)
