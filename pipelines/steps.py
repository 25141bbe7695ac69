"""KFP v2 components: a few lines each that unpack artifacts, call one plain function, write outputs.

Every component runs in the one project image (`infra/Dockerfile`); bodies import the project
inside the function, so the same component runs under kfp.local's SubprocessRunner (the installed
package) and on Kubeflow / Vertex AI (the image). Configuration arrives as the JSON of one config
section and is validated by the same pydantic model the CLI uses.
"""

from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

# The project image; `tumorflow compile --image` rewrites it in the compiled spec.
PROJECT_IMAGE = "ghcr.io/tumorflow/tumorflow-python:0.1.0"

component = dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)


@component
def download(source: str, dataset: dict, raw: Output[Dataset]):
    """Fetch the images (phantom, folder, archive, kaggle:, gs://) and write their manifest."""
    from pathlib import Path

    from tumorflow.components.download import download_dataset
    from tumorflow.core.config import DatasetConfig

    result = download_dataset(source, Path(raw.path), DatasetConfig.model_validate(dataset))
    raw.metadata.update(result.summary())


@component
def validate_and_split(
    raw: Input[Dataset],
    split_config: dict,
    classes: list,
    split: Output[Dataset],
    report: Output[Markdown],
):
    """Decode and quarantine, group near-duplicates, split by groups, write TFRecord shards."""
    from pathlib import Path

    from tumorflow.components.validate import validate_and_split as run
    from tumorflow.core.config import SplitConfig

    result = run(
        Path(raw.path), Path(split.path), SplitConfig.model_validate(split_config), classes
    )
    split.metadata.update(result.summary())
    Path(report.path).write_text(result.report_markdown())


@component
def train(
    split: Input[Dataset],
    train_config: dict,
    checkpoint_root: str,
    tracking_uri: str,
    experiment: str,
    pipeline_run: str,
    model: Output[Model],
):
    """Two-stage fine-tuning, then the serving SavedModel exported once (with its digests) into
    the model; resumes from `checkpoint_root` when the same inputs ran before."""
    from pathlib import Path

    from tumorflow.components.export import export_model_artifact
    from tumorflow.components.train import checkpoint_key, train_model
    from tumorflow.core.config import TrainConfig

    config = TrainConfig.model_validate(train_config)
    result = train_model(
        Path(split.path),
        Path(model.path),
        config,
        checkpoint_dir=Path(checkpoint_root) / checkpoint_key(Path(split.path), config),
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        run_tags={"tumorflow.pipeline_run": pipeline_run},
    )
    model.metadata.update({**result.summary(), **export_model_artifact(Path(model.path))})


@component
def evaluate(
    model: Input[Model],
    split: Input[Dataset],
    tracking_uri: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    positive_class: str = "tumor",
):
    """Score the held-out test split through the model's serving SavedModel; log to MLflow and
    to the pipeline UI (the ROC curve of `positive_class`)."""
    import json
    from pathlib import Path

    from tumorflow.components.evaluate import evaluate_model, log_kfp_metrics

    info = json.loads((Path(model.path) / "model_info.json").read_text())
    result = evaluate_model(
        Path(model.path),
        Path(split.path),
        Path(evaluation.path),
        tracking_uri=tracking_uri or None,
        mlflow_run_id=info.get("mlflow_run_id"),
        positive_class=positive_class,
    )
    log_kfp_metrics(result, Path(evaluation.path), metrics, classification, positive_class)


@component
def drift_reference(split: Input[Dataset], model: Input[Model], reference: Output[Dataset]):
    """Drift features of the training split, stored with the model version when it deploys."""
    from pathlib import Path

    from tumorflow.components.drift_features import build_reference

    build_reference(Path(split.path), Path(model.path), Path(reference.path))


@component
def drift_report(
    split: Input[Dataset],
    model_base_path: str,
    model_name: str,
    drift_share: float,
    tracking_uri: str,
    report: Output[HTML],
    verdict: Output[Artifact],
):
    """Compare the new training data with the deployed model's reference (Evidently report)."""
    from pathlib import Path

    from tumorflow.components.drift import drift_against_served_model

    drift_against_served_model(
        Path(split.path),
        model_base_path,
        model_name,
        Path(verdict.path),
        drift_share=drift_share,
        html_path=Path(report.path),
        tracking_uri=tracking_uri or None,
    )


@component
def drift_check(
    current_source: str,
    model_base_path: str,
    model_name: str,
    drift_share: float,
    window_hours: float,
    report: Output[HTML],
    verdict: Output[Artifact],
) -> bool:
    """Recent served requests (or images) against the served model's reference: drifted?"""
    import shutil
    from pathlib import Path

    from tumorflow.components.monitor import check_recent_drift, resolve_served_reference

    reference, model_dir = resolve_served_reference(model_base_path, model_name)
    result, _ = check_recent_drift(
        current_source,
        reference,
        Path(verdict.path),
        drift_share=drift_share,
        window_hours=window_hours,
        model_name=model_name,
        model_dir=model_dir,
    )
    if result.html_path:
        shutil.copyfile(result.html_path, report.path)
    else:
        Path(report.path).write_text(f"<p>{result.message}</p>")
    verdict.metadata.update({"drift_detected": result.drift_detected})
    return result.drift_detected


@component
def gate(
    evaluation: Input[Artifact],
    split: Input[Dataset],
    gate_config: dict,
    tracking_uri: str,
    model_name: str,
    model_base_path: str,
    decision: Output[Artifact],
    report: Output[Markdown],
    champion_classification: Output[ClassificationMetrics],
) -> bool:
    """Absolute thresholds plus champion/challenger on the same test images: the blessing.

    Fails when a version is served under `model_base_path` but the registry cannot be read."""
    from pathlib import Path

    from tumorflow.components.gate import run_gate
    from tumorflow.core.config import GateConfig

    result = run_gate(
        Path(evaluation.path),
        Path(split.path),
        GateConfig.model_validate(gate_config),
        tracking_uri=tracking_uri or None,
        model_name=model_name,
        output_dir=Path(decision.path),
        model_base_path=model_base_path or None,
    )
    Path(report.path).write_text(result.markdown)
    result.log_champion_classification(champion_classification)
    decision.metadata.update({"passed": result.passed})
    return result.passed


@component
def approval(
    decision: Input[Artifact],
    model: Input[Model],
    gate_config: dict,
    tracking_uri: str,
    model_name: str,
    pipeline_run: str,
    record: Output[Artifact],
) -> bool:
    """Register the candidate; in manual mode wait for `tumorflow approve|reject RUN`."""
    from pathlib import Path

    from tumorflow.components.approval import run_approval
    from tumorflow.core.config import GateConfig

    result = run_approval(
        Path(decision.path),
        Path(model.path),
        GateConfig.model_validate(gate_config),
        tracking_uri=tracking_uri or None,
        model_name=model_name,
        pipeline_run=pipeline_run,
        output_dir=Path(record.path),
    )
    record.metadata.update(result.summary())
    return result.approved


@component
def deploy(
    model: Input[Model],
    decision: Input[Artifact],
    record: Input[Artifact],
    reference: Input[Dataset],
    model_base_path: str,
    model_name: str,
    keep_versions: int,
    rollout: str,
    tracking_uri: str,
    pipeline_run: str,
) -> int:
    """Publish the gated SavedModel as a new version, atomically; move the registry aliases.

    Returns the new version, or 0 when the model is identical to the served one (nothing new)."""
    from pathlib import Path

    from tumorflow.components.deploy import deploy_model

    result = deploy_model(
        Path(model.path),
        Path(decision.path) / "decision.json",
        model_base_path,
        model_name,
        keep_versions=keep_versions,
        tracking_uri=tracking_uri or None,
        pipeline_run=pipeline_run,
        drift_reference=Path(reference.path),
        approval_dir=Path(record.path),
        rollout=rollout,
    )
    return result.version if result.deployed else 0
