"""The retraining DAG: the whole story of one scheduled run, in order.

    download ─► validate & split ─► train (GPU) ─► evaluate ─► gate ─► approval ─► deploy
                       │                 └────► drift reference ───────────────────┘
                       └─► drift report (new data vs the served model's reference)

Deploy runs only when the approval step approves, and approval only approves a passing gate
(or, in manual mode, an explicit override). Every knob is a pipeline parameter: one JSON section
of the typed configuration per step, so the pipeline UI shows and edits each of them.
"""

from pathlib import Path

from kfp import dsl

from tumorflow.core.config import PipelineConfig
from tumorflow.pipelines import steps

PIPELINE_NAME = "tumorflow-retrain"
_DEFAULTS = PipelineConfig()
_DATASET = _DEFAULTS.dataset.model_dump(exclude_none=True)
_SPLIT = _DEFAULTS.split.model_dump(exclude_none=True)
_TRAIN = _DEFAULTS.train.model_dump(exclude_none=True)
_GATE = _DEFAULTS.gate.model_dump(exclude_none=True)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Download, validate and split CT/MRI images without leakage, fine-tune in two "
    "stages, evaluate, gate against the champion, approve, and deploy to TF Serving.",
)
def retrain_pipeline(
    source: str = _DEFAULTS.dataset.source,
    dataset: dict = _DATASET,
    split_config: dict = _SPLIT,
    train_config: dict = _TRAIN,
    gate_config: dict = _GATE,
    classes: list = _DEFAULTS.dataset.classes,
    model_name: str = _DEFAULTS.deploy.model_name,
    model_base_path: str = "gs://tumorflow-models/serving",
    keep_versions: int = _DEFAULTS.deploy.keep_versions,
    rollout: str = _DEFAULTS.deploy.rollout,
    tracking_uri: str = "",
    experiment: str = _DEFAULTS.tracking.experiment,
    checkpoint_root: str = "/gcs/tumorflow-models/checkpoints",
    drift_share: float = _DEFAULTS.drift.drift_share,
    accelerator_type: str = _DEFAULTS.runtime.accelerator_type,
    accelerator_count: int = _DEFAULTS.runtime.accelerator_count,
    train_cpu: str = _DEFAULTS.runtime.train_cpu,
    train_memory: str = _DEFAULTS.runtime.train_memory,
):
    # Names this run in MLflow tags and `tumorflow approve RUN`; resolved by the backend.
    pipeline_run = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
    fetched = steps.download(source=source, dataset=dataset).set_display_name("download")

    splitting = steps.validate_and_split(
        raw=fetched.outputs["raw"], split_config=split_config, classes=classes
    ).set_display_name("validate & split")
    split = splitting.outputs["split"]

    drift = steps.drift_report(
        split=split,
        model_base_path=model_base_path,
        model_name=model_name,
        drift_share=drift_share,
        tracking_uri=tracking_uri,
    ).set_display_name("drift report")
    drift.set_caching_options(False)

    training = (
        steps.train(
            split=split,
            train_config=train_config,
            checkpoint_root=checkpoint_root,
            tracking_uri=tracking_uri,
            experiment=experiment,
            pipeline_run=pipeline_run,
        )
        .set_display_name("two-stage fine-tuning")
        .set_accelerator_type(accelerator_type)
        .set_accelerator_limit(accelerator_count)
        .set_cpu_limit(train_cpu)
        .set_memory_limit(train_memory)
        .set_retry(num_retries=2)
    )
    model = training.outputs["model"]

    evaluation = steps.evaluate(model=model, split=split, tracking_uri=tracking_uri)
    evaluation.set_display_name("evaluate")

    reference = steps.drift_reference(split=split, model=model).set_display_name("drift reference")

    gating = steps.gate(
        evaluation=evaluation.outputs["evaluation"],
        split=split,
        gate_config=gate_config,
        tracking_uri=tracking_uri,
        model_name=model_name,
        model_base_path=model_base_path,
    ).set_display_name("gate: thresholds + champion/challenger")
    gating.set_caching_options(False)

    approving = steps.approval(
        decision=gating.outputs["decision"],
        model=model,
        gate_config=gate_config,
        tracking_uri=tracking_uri,
        model_name=model_name,
        pipeline_run=pipeline_run,
    ).set_display_name("approval")
    approving.set_caching_options(False)

    with dsl.If(approving.outputs["Output"] == True, name="approved"):  # noqa: E712
        steps.deploy(
            model=model,
            decision=gating.outputs["decision"],
            record=approving.outputs["record"],
            reference=reference.outputs["reference"],
            model_base_path=model_base_path,
            model_name=model_name,
            keep_versions=keep_versions,
            rollout=rollout,
            tracking_uri=tracking_uri,
            pipeline_run=pipeline_run,
        ).set_display_name("deploy to TF Serving").set_caching_options(False)


MONITOR_PIPELINE_NAME = "tumorflow-monitor"


@dsl.pipeline(
    name=MONITOR_PIPELINE_NAME,
    description="Check the recent window of served requests for drift against the served "
    "model's reference; when it drifted, run the retraining pipeline.",
)
def monitor_pipeline(
    current_source: str,
    window_hours: float = _DEFAULTS.drift.window_hours,
    source: str = _DEFAULTS.dataset.source,
    dataset: dict = _DATASET,
    split_config: dict = _SPLIT,
    train_config: dict = _TRAIN,
    gate_config: dict = _GATE,
    classes: list = _DEFAULTS.dataset.classes,
    model_name: str = _DEFAULTS.deploy.model_name,
    model_base_path: str = "gs://tumorflow-models/serving",
    keep_versions: int = _DEFAULTS.deploy.keep_versions,
    rollout: str = _DEFAULTS.deploy.rollout,
    tracking_uri: str = "",
    experiment: str = _DEFAULTS.tracking.experiment,
    checkpoint_root: str = "/gcs/tumorflow-models/checkpoints",
    drift_share: float = _DEFAULTS.drift.drift_share,
    accelerator_type: str = _DEFAULTS.runtime.accelerator_type,
    accelerator_count: int = _DEFAULTS.runtime.accelerator_count,
    train_cpu: str = _DEFAULTS.runtime.train_cpu,
    train_memory: str = _DEFAULTS.runtime.train_memory,
):
    check = steps.drift_check(
        current_source=current_source,
        model_base_path=model_base_path,
        model_name=model_name,
        drift_share=drift_share,
        window_hours=window_hours,
    ).set_display_name("drift check: recent requests vs served reference")
    check.set_caching_options(False)
    with dsl.If(check.outputs["Output"] == True, name="drifted"):  # noqa: E712
        retrain_pipeline(
            source=source,
            dataset=dataset,
            split_config=split_config,
            train_config=train_config,
            gate_config=gate_config,
            classes=classes,
            model_name=model_name,
            model_base_path=model_base_path,
            keep_versions=keep_versions,
            rollout=rollout,
            tracking_uri=tracking_uri,
            experiment=experiment,
            checkpoint_root=checkpoint_root,
            drift_share=drift_share,
            accelerator_type=accelerator_type,
            accelerator_count=accelerator_count,
            train_cpu=train_cpu,
            train_memory=train_memory,
        ).set_display_name("retrain")


def pipeline_arguments(config: PipelineConfig, *, local: bool) -> dict:
    """The pipeline's parameters for one run of `config` (local paths resolved when `local`)."""
    arguments = {
        "source": config.dataset.source,
        "dataset": config.dataset.model_dump(exclude_none=True),
        "split_config": config.split.model_dump(exclude_none=True),
        "train_config": config.train.model_dump(exclude_none=True),
        "gate_config": config.gate.model_dump(exclude_none=True),
        "classes": config.dataset.classes,
        "model_name": config.deploy.model_name,
        "keep_versions": config.deploy.keep_versions,
        "rollout": config.deploy.rollout,
        "experiment": config.tracking.experiment,
        "drift_share": config.drift.drift_share,
        "accelerator_type": config.runtime.accelerator_type,
        "accelerator_count": config.runtime.accelerator_count,
        "train_cpu": config.runtime.train_cpu,
        "train_memory": config.runtime.train_memory,
    }
    if local:
        arguments.update(
            model_base_path=config.resolved_model_base_path(),
            tracking_uri=config.resolved_tracking_uri(),
            checkpoint_root=str(local_checkpoint_root(config)),
        )
    else:
        if config.deploy.model_base_path:
            arguments["model_base_path"] = config.deploy.model_base_path
        if config.tracking.tracking_uri:
            arguments["tracking_uri"] = config.tracking.tracking_uri
    return arguments


def local_checkpoint_root(config: PipelineConfig) -> Path:
    return (Path(config.run_root) / "checkpoints").resolve()
