"""KFP v2 components: a few lines each that unpack artifacts, call one plain function, write outputs.

Every component runs in the one project image (`infra/Dockerfile`); bodies import the project
inside the function, so the same component runs under kfp.local's SubprocessRunner (the installed
package) and on Kubeflow / Vertex AI (the image). Configuration arrives as the JSON of one config
section and is validated by the same pydantic model the CLI uses. Bodies that load TensorFlow,
MLflow or Evidently end their process without the interpreter's final garbage collections
(pipelines/task_process.py).
"""

import copy
from typing import Any, NamedTuple

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

from tumorflow.core.config import RuntimeConfig

# The project image, from the config's one default; `tumorflow compile` writes the configured
# runtime.image into the compiled spec.
PROJECT_IMAGE = RuntimeConfig().image

component = dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)


def in_image(step: Any, image: str) -> Any:
    """`step` (declared in the default image) running in `image`: the one way a step is put into
    the configured image. The compiled executor, a Vertex worker pool or a TFJob then names it;
    the pipelines are traced with it (pipelines/pipeline.py), for `tumorflow compile` and for
    `tumorflow run --runner docker` alike."""
    if step.component_spec.implementation.container.image == image:
        return step
    spec = copy.deepcopy(step.component_spec)
    spec.implementation.container.image = image
    relabelled = copy.copy(step)
    relabelled.component_spec = spec
    return relabelled


@component
def dataset_version(dataset: dict) -> NamedTuple(
    "Version", fingerprint=str, source=str, detail=dict
):
    """What the source holds now, as a content fingerprint. Never cached: the download after it
    is cached on this fingerprint, so changed data is downloaded again and unchanged data is not."""
    from collections import namedtuple

    from tumorflow.components.data.dataset_version import resolve_dataset_version
    from tumorflow.core.config import DatasetConfig

    version = resolve_dataset_version(DatasetConfig.model_validate(dataset))
    return namedtuple("Version", "fingerprint source detail")(
        version.fingerprint, version.source, version.detail
    )


@component
def download(dataset: dict, fingerprint: str, source: str, detail: dict, raw: Output[Dataset]):
    """Fetch the images (phantom, folder, archive, kaggle:, gs://) and write their manifest."""
    from pathlib import Path

    from tumorflow.components.data.dataset_version import DatasetVersion
    from tumorflow.components.data.download import download_dataset
    from tumorflow.core.config import DatasetConfig

    result = download_dataset(
        source,
        Path(raw.path),
        DatasetConfig.model_validate(dataset),
        DatasetVersion(fingerprint, source, detail),
    )
    raw.metadata.update(result.summary())


@component
def validate_and_split(
    raw: Input[Dataset],
    split_config: dict,
    dataset: dict,
    split: Output[Dataset],
    report: Output[Markdown],
):
    """Decode and quarantine, group near-duplicates, split by groups, write TFRecord shards."""
    from pathlib import Path

    from tumorflow.components.data.validate import validate_and_split as run
    from tumorflow.core.config import SplitConfig

    result = run(
        Path(raw.path),
        Path(split.path),
        SplitConfig.model_validate(split_config),
        dataset.get("classes") or None,
    )
    split.metadata.update(result.summary())
    Path(report.path).write_text(result.report_markdown())


@component
def external_versions(dataset: dict, gate_config: dict) -> NamedTuple(
    "ExternalVersions", sets=list, versions=dict
):
    """The external-site sets of `gate.external_sets` and what each source holds now (a content
    fingerprint each). Never cached, like the dataset version: the preparing step is cached on it."""
    from collections import namedtuple

    from tumorflow.components.data.external_sets import resolve_external_versions
    from tumorflow.core.config import DatasetConfig, GateConfig

    sets = GateConfig.model_validate(gate_config).external_sets
    versions = resolve_external_versions(sets, DatasetConfig.model_validate(dataset))
    return namedtuple("ExternalVersions", "sets versions")(
        [external.model_dump(exclude_none=True) for external in sets], versions
    )


@component
def external_sets(
    dataset: dict,
    split_config: dict,
    sets: list,
    versions: dict,
    external: Output[Dataset],
):
    """Download and validate each external set like the training data, all of it held out
    (never trained on); cached on the sets' dataset versions."""
    from pathlib import Path

    from tumorflow.components.data.external_sets import prepare_external_sets
    from tumorflow.core.config import DatasetConfig, ExternalSetConfig, SplitConfig

    index = prepare_external_sets(
        [ExternalSetConfig.model_validate(entry) for entry in sets],
        DatasetConfig.model_validate(dataset),
        SplitConfig.model_validate(split_config),
        versions,
        Path(external.path),
    )
    external.metadata.update({entry["name"]: entry["dataset_version"] for entry in index})


@component
def train(
    split: Input[Dataset],
    train_config: dict,
    checkpoint_root: str,
    tracking_uri: str,
    experiment: str,
    model: Output[Model],
):
    """Two-stage fine-tuning, then the serving SavedModel exported once (with its digests) into
    the model; resumes from `checkpoint_root` when the same inputs ran before.

    Cached: its inputs name everything the model depends on (the split, hence the dataset
    version, and the training section), and nothing of one run."""
    from pathlib import Path

    from tumorflow.components.training.export import export_model_artifact
    from tumorflow.components.training.train import checkpoint_key, train_model
    from tumorflow.core.config import TrainConfig
    from tumorflow.pipelines.task_process import end_without_final_collection

    end_without_final_collection()

    config = TrainConfig.model_validate(train_config)
    result = train_model(
        Path(split.path),
        Path(model.path),
        config,
        checkpoint_dir=Path(checkpoint_root) / checkpoint_key(Path(split.path), config),
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        run_tags={"tumorflow.dataset_version": split.metadata.get("dataset_version", "")},
    )
    # A non-chief worker of a multi-worker job trained into a scratch folder (distribute.py).
    model.metadata.update({**result.summary(), **export_model_artifact(result.model_dir)})


@component
def evaluate(
    model: Input[Model],
    split: Input[Dataset],
    tracking_uri: str,
    dataset: dict,
    external: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    reference: Output[Dataset],
    embedding_components: int = 8,
):
    """Score the held-out test split and the external sets through the model's serving
    SavedModel; log to MLflow and to the pipeline UI (the ROC curve of the dataset's
    `positive_class`). Then, through the same SavedModel, the drift features of the training
    split (`reference`): deploy stores them with the model version, and the monitor compares the
    served traffic with them. `embedding_components` is `drift.embedding_components` (the
    default is DriftConfig's).

    One step for both: each is a pass of the same model over a split, and a step of its own paid
    TensorFlow's import and the model's load again (about 6 s a run on 2 cores)."""
    import json
    from pathlib import Path

    from tumorflow.components.data.external_sets import external_splits
    from tumorflow.components.evaluation.evaluate import evaluate_model, log_kfp_metrics
    from tumorflow.components.monitoring.features import build_reference
    from tumorflow.core.artifacts import MODEL_INFO_FILE, SERVING_EXPORT
    from tumorflow.pipelines.task_process import end_without_final_collection

    end_without_final_collection()

    positive_class = dataset.get("positive_class") or "tumor"
    info = json.loads((Path(model.path) / MODEL_INFO_FILE).read_text())
    result = evaluate_model(
        Path(model.path),
        Path(split.path),
        Path(evaluation.path),
        tracking_uri=tracking_uri or None,
        mlflow_run_id=info.get("mlflow_run_id"),
        positive_class=positive_class,
        external_splits=external_splits(Path(external.path)),
    )
    log_kfp_metrics(result, Path(evaluation.path), metrics, classification, positive_class)
    # The UI reads these two from their metadata; a file at each path lets kfp.local's cache,
    # which treats an output without a file as missing, reuse this step.
    for artifact in (metrics, classification):
        Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
        Path(artifact.path).write_text(json.dumps(artifact.metadata))
    build_reference(
        Path(split.path),
        Path(model.path) / SERVING_EXPORT,
        Path(reference.path),
        embedding_components=embedding_components,
    )


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

    from tumorflow.components.monitoring.drift_report import drift_against_served_model
    from tumorflow.pipelines.task_process import end_without_final_collection

    end_without_final_collection()

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
    dataset: dict,
    report: Output[HTML],
    verdict: Output[Artifact],
    reason: dsl.OutputPath(str),
) -> bool:
    """Recent served requests (or images) against the served model's reference: drifted, and
    why (`reason` becomes the retraining run's `trigger_reason`; trigger.json records it).
    DICOM in a folder of recent images is decoded with the dataset's window, as training does.

    (A bool return and an output-path parameter rather than a NamedTuple: kfp.local cannot
    resolve a dsl.If condition on a NamedTuple field.)"""
    import shutil
    from pathlib import Path

    from tumorflow.components.monitoring.drift_report import resolve_served_reference
    from tumorflow.components.monitoring.monitor import check_recent_drift, write_trigger_record
    from tumorflow.core.config import DatasetConfig
    from tumorflow.pipelines.task_process import end_without_final_collection

    end_without_final_collection()

    reference, model_dir = resolve_served_reference(model_base_path, model_name)
    result, window = check_recent_drift(
        current_source,
        reference,
        Path(verdict.path),
        drift_share=drift_share,
        window_hours=window_hours,
        model_name=model_name,
        model_dir=model_dir,
        dicom_config=DatasetConfig.model_validate(dataset).dicom,
    )
    if result.html_path:
        shutil.copyfile(result.html_path, report.path)
    else:
        Path(report.path).write_text(f"<p>{result.message}</p>")
    why = ""
    if result.drift_detected:
        record = write_trigger_record(result, window, current_source, reference, Path(verdict.path))
        why = record["reason"]
    verdict.metadata.update({"drift_detected": result.drift_detected, "reason": why})
    Path(reason).parent.mkdir(parents=True, exist_ok=True)
    Path(reason).write_text(why)
    return result.drift_detected


@component
def gate(
    evaluation: Input[Artifact],
    split: Input[Dataset],
    gate_config: dict,
    tracking_uri: str,
    model_name: str,
    model_base_path: str,
    external: Input[Dataset],
    decision: Output[Artifact],
    report: Output[Markdown],
    champion_classification: Output[ClassificationMetrics],
) -> bool:
    """Absolute thresholds plus champion/challenger on the same test images and on each external
    set: the blessing.

    Fails when a version is served under `model_base_path` but the registry cannot be read."""
    from pathlib import Path

    from tumorflow.components.gate.decision import run_gate
    from tumorflow.core.config import GateConfig
    from tumorflow.pipelines.task_process import end_without_final_collection

    end_without_final_collection()

    result = run_gate(
        Path(evaluation.path),
        Path(split.path),
        GateConfig.model_validate(gate_config),
        tracking_uri=tracking_uri or None,
        model_name=model_name,
        output_dir=Path(decision.path),
        model_base_path=model_base_path or None,
        external_dir=Path(external.path),
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
    trigger_reason: str,
    record: Output[Artifact],
    report: Output[Markdown],
    console_base_url: str = "",
    trust_root: str = "",
    pipeline_key: str = "",
    audit_log: str = "",
) -> bool:
    """Register the candidate (tagged with why the run started); wait for a person when the
    model's policy or the run's config says manual (the console's review page, or
    `tumorflow approve|reject RUN`). The report links to that page (`console_base_url`, empty:
    the config's default). Only a signed decision that verifies against `trust_root` counts;
    `pipeline_key` signs automatic approvals."""
    from pathlib import Path

    from tumorflow.components.release.approval import APPROVAL_REPORT, run_approval
    from tumorflow.components.release.signing import load_signer
    from tumorflow.components.release.trust_root import PIPELINE, TrustRoot
    from tumorflow.core.config import ConsoleConfig, GateConfig
    from tumorflow.pipelines.task_process import end_without_final_collection

    end_without_final_collection()

    console = ConsoleConfig(base_url=console_base_url) if console_base_url else ConsoleConfig()
    review_url = console.review_url(pipeline_run)
    result = run_approval(
        Path(decision.path),
        Path(model.path),
        GateConfig.model_validate(gate_config),
        tracking_uri=tracking_uri or None,
        model_name=model_name,
        pipeline_run=pipeline_run,
        output_dir=Path(record.path),
        trust=TrustRoot.load(trust_root),
        pipeline_signer=load_signer(pipeline_key, PIPELINE) if pipeline_key else None,
        trigger_reason=trigger_reason,
        review_url=review_url,
        audit_log=audit_log,
    )
    Path(report.path).write_text((Path(record.path) / APPROVAL_REPORT).read_text())
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
    trust_root: str = "",
    audit_log: str = "",
) -> int:
    """Publish the gated SavedModel as a new version, atomically; move the registry aliases.
    The approving signed record is verified again against `trust_root` and published with it.

    Returns the new version, or 0 when the model is identical to the served one (nothing new)."""
    from pathlib import Path

    from tumorflow.components.release.deploy import deploy_model
    from tumorflow.components.release.trust_root import TrustRoot
    from tumorflow.core.artifacts import DECISION_FILE
    from tumorflow.pipelines.task_process import end_without_final_collection

    end_without_final_collection()

    result = deploy_model(
        Path(model.path),
        Path(decision.path) / DECISION_FILE,
        model_base_path,
        model_name,
        keep_versions=keep_versions,
        tracking_uri=tracking_uri or None,
        pipeline_run=pipeline_run,
        drift_reference=Path(reference.path),
        approval_dir=Path(record.path),
        rollout=rollout,
        trust=TrustRoot.load(trust_root),
        audit_log=audit_log,
    )
    return result.version if result.deployed else 0
