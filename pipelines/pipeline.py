"""The retraining DAG: the whole story of one scheduled run, in order.

    dataset version ─► download ─► validate & split ─► train (GPU) ─► evaluate ─► gate ─► approval ─► deploy
                                        │                                  └─ drift reference ────────────────┘
                                        └─► drift report (new data vs the served model's reference)
    external sets: versions ─► download & validate (held out) ───────► evaluate, gate

The dataset version step is never cached: it fingerprints what the source holds now, and every
step after it is cached on that fingerprint (docs/caching.md), so new data is always trained on and
an unchanged dataset reuses the earlier run. Deploy runs only when the approval step approves, and
approval only approves a passing gate (or an explicit, reasoned override).

The pipeline's parameters come from the typed configuration, once (`pipeline_parameters`): the
dataset, split, train and gate sections as one JSON parameter each, the deploy, tracking, drift
and runtime sections field by field, plus the run's `trigger_reason`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

from kfp import dsl

from tumorflow.core.config import PipelineConfig, RuntimeConfig
from tumorflow.pipelines import cluster_training, steps

PIPELINE_NAME = "tumorflow-retrain"
MONITOR_PIPELINE_NAME = "tumorflow-monitor"

# Config sections a step takes whole, and the parameter that carries each.
WHOLE_SECTIONS = {
    "dataset": "dataset",
    "split": "split_config",
    "train": "train_config",
    "gate": "gate_config",
}
# Config sections whose fields are parameters of their own (the steps take single values).
FIELD_SECTIONS = ("deploy", "tracking", "drift", "runtime")
# Fields that are not run parameters: the image and the training layout are fixed at compile
# time (pipelines/cluster_training.py), the bucket only resolves the cluster defaults, the request
# sample rate belongs to the server.
NOT_PARAMETERS = frozenset(
    {f"runtime.{field}" for field in cluster_training.COMPILED_FIELDS}
    | {"runtime.bucket", "drift.request_sample_rate"}
)
# Parameters of one run that are not configuration.
RUN_PARAMETERS = {"trigger_reason": ""}
# The runtime section the DAGs are traced with: its image and training layout (target, workers,
# machine type, GPU node pool) shape the DAG, so they are fixed when the pipeline is compiled.
_TRACED_RUNTIME: contextvars.ContextVar[RuntimeConfig | None] = contextvars.ContextVar(
    "traced_runtime", default=None
)


# The retraining pipeline the monitoring pipeline nests, traced for the same runtime.
_NESTED_RETRAIN: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "nested_retrain", default=None
)


def _runtime() -> RuntimeConfig:
    return _TRACED_RUNTIME.get() or RuntimeConfig()


# Where the approval and deploy pods see the release Secrets (runtime.trust_root_secret,
# runtime.pipeline_key_secret) on Kubeflow.
TRUST_ROOT_MOUNT = "/etc/tumorflow/trust-root"
TRUST_ROOT_MOUNTED = f"{TRUST_ROOT_MOUNT}/trust_root.yaml"
PIPELINE_KEY_MOUNT = "/etc/tumorflow/pipeline-key"
PIPELINE_KEY_MOUNTED = f"{PIPELINE_KEY_MOUNT}/pipeline"


def _with_release_secrets(task: Any) -> Any:
    """The Kubernetes Secrets of signed decisions mounted, read-only, into `task`'s pod: the trust
    root and the pipeline's key (Kubeflow only; kfp.local ignores them)."""
    runtime = _runtime()
    if runtime.target != "kubeflow":
        return task
    from kfp import kubernetes

    for secret, mount in (
        (runtime.trust_root_secret, TRUST_ROOT_MOUNT),
        (runtime.pipeline_key_secret, PIPELINE_KEY_MOUNT),
    ):
        if secret:
            kubernetes.use_secret_as_volume(task, secret_name=secret, mount_path=mount)
    return task


def _in_image(component: Any) -> Any:
    return steps.in_image(component, _runtime().image)


def pipeline_parameters(
    config: PipelineConfig, *, local: bool, no_registry: bool = False
) -> dict[str, Any]:
    """The pipeline's parameters for one run of `config`.

    `local`: paths resolved for kfp.local on this machine (the run root's model folder, SQLite
    registry, checkpoints). Otherwise for a cluster: the bucket's defaults, and a tracking URI
    that must name an MLflow server (`no_registry` allows none).
    """
    values: dict[str, Any] = {
        name: getattr(config, section).model_dump(exclude_none=True)
        for section, name in WHOLE_SECTIONS.items()
    }
    for section in FIELD_SECTIONS:
        for field, value in getattr(config, section).model_dump().items():
            if f"{section}.{field}" not in NOT_PARAMETERS:
                values[field] = value
    values["model_base_path"] = config.resolved_model_base_path(local=local)
    values["checkpoint_root"] = config.resolved_checkpoint_root(local=local)
    values["tracking_uri"] = (
        config.resolved_tracking_uri()
        if local
        else config.cluster_tracking_uri(no_registry=no_registry)
    )
    # The approval report links to the run's review page in the console.
    values["console_base_url"] = config.console.base_url
    # Signed decisions (docs/signing.md): the trust root, the pipeline's key, the chained log.
    runtime = config.runtime
    values.update(
        trust_root=config.resolved_trust_root()
        if local
        else config.release.trust_root or (TRUST_ROOT_MOUNTED if runtime.trust_root_secret else ""),
        pipeline_key=config.resolved_pipeline_key()
        if local
        else config.release.pipeline_key
        or (PIPELINE_KEY_MOUNTED if runtime.pipeline_key_secret else ""),
        audit_log=config.resolved_audit_log() if local else config.console.audit_log,
    )
    return values | RUN_PARAMETERS


def _annotation(section: str, field: str) -> type:
    if section in WHOLE_SECTIONS:
        return dict
    annotation = PipelineConfig.model_fields[section].annotation.model_fields[field].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def _signature(*leading: inspect.Parameter) -> inspect.Signature:
    """The pipeline function's signature: `leading`, then every parameter with its default."""
    defaults = pipeline_parameters(PipelineConfig(), local=False, no_registry=True)
    annotations = {name: _annotation(section, "") for section, name in WHOLE_SECTIONS.items()}
    for section in FIELD_SECTIONS:
        for field in getattr(PipelineConfig(), section).model_fields:
            if f"{section}.{field}" not in NOT_PARAMETERS:
                annotations[field] = _annotation(section, field)
    annotations |= {name: type(value) for name, value in RUN_PARAMETERS.items()}
    annotations |= dict.fromkeys(
        ("console_base_url", "trust_root", "pipeline_key", "audit_log"), str
    )
    parameters = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=value,
            annotation=annotations[name],
        )
        for name, value in defaults.items()
    ]
    return inspect.Signature([*leading, *parameters])


def _with_config_parameters(*leading: inspect.Parameter) -> Callable:
    """Give a DAG body `body(p)` (p: parameter name -> pipeline channel) the pipeline function
    signature KFP reads, built from the config model, so the list is written nowhere by hand."""

    def decorate(body: Callable[[dict[str, Any]], None]) -> Callable:
        signature = _signature(*leading)

        @functools.wraps(body)
        def pipeline_function(*args: Any, **kwargs: Any) -> None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            body(dict(bound.arguments))

        pipeline_function.__signature__ = signature
        pipeline_function.__annotations__ = {
            p.name: p.annotation for p in signature.parameters.values()
        }
        return pipeline_function

    return decorate


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Download, validate and split CT/MRI images without leakage, fine-tune in two "
    "stages, evaluate, gate against the champion, approve, and deploy to TF Serving.",
)
@_with_config_parameters()
def retrain_pipeline(p: dict[str, Any]) -> None:
    # Names this run in MLflow tags and `tumorflow approve RUN`; resolved by the backend. Only
    # the uncached steps (approval, deploy) take it.
    pipeline_run = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
    version = _in_image(steps.dataset_version)(dataset=p["dataset"]).set_display_name(
        "dataset version"
    )
    version.set_caching_options(False)
    fetched = _in_image(steps.download)(
        dataset=p["dataset"],
        fingerprint=version.outputs["fingerprint"],
        source=version.outputs["source"],
        detail=version.outputs["detail"],
    ).set_display_name("download")

    splitting = _in_image(steps.validate_and_split)(
        raw=fetched.outputs["raw"], split_config=p["split_config"], dataset=p["dataset"]
    ).set_display_name("validate & split")
    split = splitting.outputs["split"]

    # External-site sets (gate.external_sets): versioned like the dataset, prepared once per
    # version, never trained on; evaluate and the gate score them.
    external_versions = _in_image(steps.external_versions)(
        dataset=p["dataset"], gate_config=p["gate_config"]
    ).set_display_name("external sets: versions")
    external_versions.set_caching_options(False)
    external = (
        _in_image(steps.external_sets)(
            dataset=p["dataset"],
            split_config=p["split_config"],
            sets=external_versions.outputs["sets"],
            versions=external_versions.outputs["versions"],
        )
        .set_display_name("external sets: download & validate")
        .outputs["external"]
    )

    drift = _in_image(steps.drift_report)(
        split=split,
        model_base_path=p["model_base_path"],
        model_name=p["model_name"],
        drift_share=p["drift_share"],
        tracking_uri=p["tracking_uri"],
    ).set_display_name("drift report")
    drift.set_caching_options(False)

    training = cluster_training.train_task(
        _in_image(steps.train),
        _runtime(),
        p,
        split=split,
        train_config=p["train_config"],
        checkpoint_root=p["checkpoint_root"],
        tracking_uri=p["tracking_uri"],
        experiment=p["experiment"],
    ).set_display_name("two-stage fine-tuning")
    model = training.outputs["model"]

    evaluation = _in_image(steps.evaluate)(
        model=model,
        split=split,
        tracking_uri=p["tracking_uri"],
        dataset=p["dataset"],
        external=external,
        embedding_components=p["embedding_components"],
    )
    evaluation.set_display_name("evaluate & drift reference")

    gating = _in_image(steps.gate)(
        evaluation=evaluation.outputs["evaluation"],
        split=split,
        gate_config=p["gate_config"],
        tracking_uri=p["tracking_uri"],
        model_name=p["model_name"],
        model_base_path=p["model_base_path"],
        external=external,
    ).set_display_name("gate: thresholds + champion/challenger")
    gating.set_caching_options(False)
    # The drift report compares the new data with the model served now (the champion): it must
    # finish before anything is deployed, or a runner that orders the DAG's free tasks its own
    # way (kfp.local) compares the new data with the model just made from it. Before the gate,
    # the reviewer at the approval also has it.
    gating.after(drift)

    approving = _in_image(steps.approval)(
        decision=gating.outputs["decision"],
        model=model,
        gate_config=p["gate_config"],
        tracking_uri=p["tracking_uri"],
        model_name=p["model_name"],
        pipeline_run=pipeline_run,
        trigger_reason=p["trigger_reason"],
        console_base_url=p["console_base_url"],
        trust_root=p["trust_root"],
        pipeline_key=p["pipeline_key"],
        audit_log=p["audit_log"],
    ).set_display_name("approval")
    approving.set_caching_options(False)
    _with_release_secrets(approving)

    with dsl.If(approving.outputs["Output"] == True, name="approved"):  # noqa: E712
        deploying = _in_image(steps.deploy)(
            model=model,
            decision=gating.outputs["decision"],
            record=approving.outputs["record"],
            reference=evaluation.outputs["reference"],
            model_base_path=p["model_base_path"],
            model_name=p["model_name"],
            keep_versions=p["keep_versions"],
            rollout=p["rollout"],
            tracking_uri=p["tracking_uri"],
            pipeline_run=pipeline_run,
            trust_root=p["trust_root"],
            audit_log=p["audit_log"],
        ).set_display_name("deploy to TF Serving")
        deploying.set_caching_options(False)
        _with_release_secrets(deploying)


def _traced_for(runtime: RuntimeConfig, pipeline: Any) -> Any:
    """`pipeline` traced again with `runtime`'s image and training layout."""
    token = _TRACED_RUNTIME.set(runtime)
    try:
        return dsl.pipeline(name=pipeline.name, description=pipeline.component_spec.description)(
            pipeline.pipeline_func
        )
    finally:
        _TRACED_RUNTIME.reset(token)


def retrain_pipeline_for(runtime: RuntimeConfig) -> Any:
    """The retraining pipeline with its steps in `runtime.image` and the training task laid out
    for `runtime` (pipelines/cluster_training.py); the module's `retrain_pipeline` is the default's."""
    if cluster_training.same_layout(runtime, RuntimeConfig()):
        return retrain_pipeline
    return _traced_for(runtime, retrain_pipeline)


@dsl.pipeline(
    name=MONITOR_PIPELINE_NAME,
    description="Check the recent window of served requests for drift against the served "
    "model's reference; when it drifted, run the retraining pipeline with the reason.",
)
@_with_config_parameters(
    inspect.Parameter("current_source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)
)
def monitor_pipeline(p: dict[str, Any]) -> None:
    check = _in_image(steps.drift_check)(
        current_source=p.pop("current_source"),
        model_base_path=p["model_base_path"],
        model_name=p["model_name"],
        drift_share=p["drift_share"],
        window_hours=p["window_hours"],
        dataset=p["dataset"],
    ).set_display_name("drift check: recent requests vs served reference")
    check.set_caching_options(False)
    # The nested retraining DAG is laid out for the same runtime (image, target, workers).
    retrain = _NESTED_RETRAIN.get() or retrain_pipeline
    with dsl.If(check.outputs["Output"] == True, name="drifted"):  # noqa: E712
        retrain(**(p | {"trigger_reason": check.outputs["reason"]})).set_display_name("retrain")


def monitor_pipeline_for(runtime: RuntimeConfig) -> Any:
    """The monitoring pipeline whose drift check and nested retraining follow `runtime`."""
    if cluster_training.same_layout(runtime, RuntimeConfig()):
        return monitor_pipeline
    # Traced first: KFP cannot define a pipeline while tracing another.
    token = _NESTED_RETRAIN.set(retrain_pipeline_for(runtime))
    try:
        return _traced_for(runtime, monitor_pipeline)
    finally:
        _NESTED_RETRAIN.reset(token)
