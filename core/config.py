"""The one typed configuration of a retraining run: defaults, YAML presets and CLI overrides.

Each pipeline step receives only the section it needs (`DatasetConfig`, `SplitConfig`,
`TrainConfig`, ...). A YAML file holds any subset of the fields; `--set a.b=value` overrides one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tumorflow.core.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomConfig(_Section):
    """The synthetic CT-like dataset used for the offline demo and the tests."""

    per_class: int = Field(100, ge=4)
    size: int = Field(96, ge=32, le=1024)
    seed: int = 0
    slices_per_patient: int = Field(4, ge=1)
    # Broken files (zero-byte, truncated, not an image) added to show the quarantine at work.
    corrupt: int = Field(0, ge=0)
    # Harder sets: image noise times `noise_scale`, lesion sizes times `lesion_scale`.
    noise_scale: float = Field(1.0, ge=0)
    lesion_scale: float = Field(1.0, gt=0, le=2)


class DicomConfig(_Section):
    """How DICOM becomes 8-bit slices, and the salt of the pseudonymous ids that replace PHI."""

    # CT: Hounsfield units (RescaleSlope/Intercept) shown through this window (abdomen: 40/400).
    window_center: float = 40.0
    window_width: float = Field(400.0, gt=0)
    # "file": the object's own window instead (per frame for enhanced multi-frame objects, from
    # their functional groups; else WindowCenter/WindowWidth), the above where it has none.
    window_source: Literal["preset", "file"] = "preset"
    # MR (and any other modality): scaled between these percentiles of the slice.
    mr_percentiles: list[float] = Field(default_factory=lambda: [1.0, 99.0])
    # Salt of the pseudonymous patient/study/site ids: this text, or the content of
    # `pseudonym_salt_file` when set. Keep it secret and fixed, so the ids stay stable.
    pseudonym_salt: str = ""
    pseudonym_salt_file: str = ""

    @field_validator("mr_percentiles")
    @classmethod
    def _percentiles_ordered(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not 0 <= value[0] < value[1] <= 100:
            raise ValueError("mr_percentiles must be two percentiles, low < high, within 0..100")
        return value


class DicomWebConfig(_Section):
    """A PACS as the dataset source (`dataset.source: dicomweb+http://host/dicom-web?QUERY`):
    how to log in, how to label its instances, and how hard to pull (docs/pacs.md)."""

    # none | basic (user and password) | bearer (a token). Credentials come from the environment
    # variables named below, or from `credentials_file` (a mounted secret: `user:password` for
    # basic, the token for bearer); they are never written anywhere.
    auth: Literal["none", "basic", "bearer"] = "none"
    username_env: str = "TUMORFLOW_PACS_USERNAME"
    password_env: str = "TUMORFLOW_PACS_PASSWORD"
    token_env: str = "TUMORFLOW_PACS_TOKEN"
    credentials_file: str = ""
    # Labels: a CSV table (`label_uid_column` -> `label_column`; a study or series UID per row),
    # or the value of one DICOM tag (a keyword such as SeriesDescription), mapped by class_map.
    label_table: str = ""
    label_uid_column: Literal["StudyInstanceUID", "SeriesInstanceUID"] = "StudyInstanceUID"
    label_column: str = "label"
    label_tag: str = ""
    # QIDO-RS page size (limit/offset), parallel WADO-RS retrievals, retries on 5xx/timeouts.
    page_size: int = Field(200, ge=1)
    concurrency: int = Field(4, ge=1, le=64)
    retries: int = Field(4, ge=0)
    backoff_seconds: float = Field(0.5, ge=0)
    timeout_seconds: float = Field(60.0, gt=0)
    # Where fetched instances are kept (raw DICOM, PHI: keep it on the ingest machine); a rerun
    # fetches only what is not there yet. Empty: ~/.cache/tumorflow/dicomweb.
    cache_dir: str = ""


class DatasetConfig(_Section):
    """Where the images come from and how folder names map to labels."""

    name: str = "phantom-kidney-ct"
    # phantom | a local folder | a .zip/.tar.gz | kaggle:<owner>/<slug>[/versions/N] | gs://bucket/prefix
    # | dicomweb+http(s)://host/dicom-web?<QIDO-RS query> (a PACS; see `dicomweb`)
    source: str = "phantom"
    # Folder inside the downloaded root that holds the class (or split) folders, if any.
    subdir: str = ""
    # Class-folder name -> label. Empty: every class folder is its own label (lower-cased).
    class_map: dict[str, str] = Field(default_factory=dict)
    # Predefined split folders -> split (train | val | test). Empty: no predefined split.
    split_dirs: dict[str, str] = Field(default_factory=dict)
    # Labels in index order. Empty: the sorted set of labels found.
    classes: list[str] = Field(default_factory=list)
    # Label whose recall matters most (the gate's default sensitivity rule).
    positive_class: str = "tumor"
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    # Refuse archives that would unpack to more than this (zip bombs).
    max_archive_bytes: int = Field(20 * 2**30, ge=1)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    # A metadata table (CSV; a path inside the dataset root, or absolute) with one row per image:
    # `metadata_path_column` holds the image's path (from the dataset root or its class folder)
    # or file name. Its `metadata_patient_column` makes patients the split groups (pseudonymous
    # ids, salted as DICOM ones); `metadata_columns` are kept as evaluation slices (site, ...).
    # Other columns never leave ingest.
    metadata_table: str = ""
    metadata_path_column: str = "path"
    metadata_patient_column: str = ""
    metadata_columns: list[str] = Field(default_factory=list)
    dicomweb: DicomWebConfig = Field(default_factory=DicomWebConfig)


class SplitConfig(_Section):
    """Validation and leakage-aware splitting."""

    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42
    # Hamming distance between 64-bit perceptual hashes at or under which two images are grouped.
    phash_max_distance: int = Field(5, ge=0, le=32)
    # Also group numbered files with consecutive numbers (`Stone- (816).jpg`, `(817)`) per class.
    group_consecutive_numbers: bool = False
    # ...but only where the two slices also look alike (pHash distance at most this): a run of
    # numbers breaks where one patient's series ends and the next begins.
    consecutive_max_distance: int = Field(12, ge=0, le=64)
    # Keep a dataset's own train/test folders (split_dirs) instead of re-splitting everything.
    keep_predefined: bool = True
    min_test_per_class: int = Field(2, ge=1)
    shard_size: int = Field(1024, ge=1)


class StageConfig(_Section):
    epochs: int = Field(5, ge=0)
    learning_rate: float = Field(1e-3, gt=0)


class AugmentConfig(_Section):
    flip_horizontal: bool = True
    flip_vertical: bool = False
    rotation_degrees: float = Field(10.0, ge=0, le=180)
    zoom: float = Field(0.1, ge=0, lt=1)
    brightness: float = Field(0.1, ge=0, lt=1)
    contrast: float = Field(0.1, ge=0, lt=1)


class TrainConfig(_Section):
    """Two-stage fine-tuning: frozen backbone warm-up, then the top layers at a lower rate."""

    backbone: Literal[
        "vgg16",
        "resnet50v2",
        "mobilenetv2",
        "efficientnetb0",
        "xception",
        "densenet121",
        "custom_cnn",
    ] = "custom_cnn"
    # imagenet | none | a path to a weights file
    weights: str = "none"
    # Input side in pixels; 0 means the backbone's default.
    image_size: int = Field(0, ge=0)
    # Grey modalities (CT, MRI): decode, cache and augment one channel, repeated into the three
    # the backbones take; serving decodes the same way. A colour image is converted to grey.
    grayscale: bool = False
    batch_size: int = Field(32, ge=1)
    stage1: StageConfig = Field(default_factory=lambda: StageConfig(epochs=5, learning_rate=1e-3))
    stage2: StageConfig = Field(default_factory=lambda: StageConfig(epochs=5, learning_rate=1e-4))
    unfreeze_top_layers: int = Field(20, ge=0)
    dropout: float = Field(0.3, ge=0, lt=1)
    early_stopping_patience: int = Field(3, ge=1)
    reduce_lr_patience: int = Field(2, ge=1)
    reduce_lr_factor: float = Field(0.3, gt=0, lt=1)
    use_class_weights: bool = True
    # The weights the model keeps: those of the best epoch over both stages by validation loss or
    # validation macro-F1, or (last) those of the final epoch.
    keep_weights: Literal["best_val_loss", "best_val_macro_f1", "last"] = "best_val_loss"
    # Learning rate within a stage: constant (ReduceLROnPlateau in stage 2), or a linear warm-up
    # over `warmup_epochs` then a cosine decay to 5% of the stage's rate by its last epoch.
    lr_schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_epochs: int = Field(1, ge=0)
    # BatchNormalization momentum of the from-scratch custom_cnn.
    batchnorm_momentum: float = Field(0.9, gt=0, lt=1)
    # custom_cnn: before each validation, recompute the BatchNormalization statistics as the plain
    # mean over a fixed sample of `batchnorm_recalibration_epoch_batches` un-augmented training
    # batches with the epoch's final weights ("precise BN"), instead of the moving averages of
    # the last steps; the weights the model keeps get it once more over up to
    # `batchnorm_recalibration_batches`. On by default: it halved the epoch-to-epoch val swing of
    # `tumorflow bench recipe`, and the 8-batch sample keeps the demo's epoch within 1.25x a plain
    # `fit` epoch (`tumorflow bench train --measure recipe`; docs/training.md).
    batchnorm_recalibration: bool = True
    batchnorm_recalibration_epoch_batches: int = Field(8, ge=1)
    batchnorm_recalibration_batches: int = Field(64, ge=1)
    # auto: mixed_float16 when a GPU is present
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    seed: int = 1
    # After training (docs/calibration_ood.md): temperature scaling fitted on the validation split,
    # folded into the export so every signature answers calibrated probabilities.
    calibration: Literal["temperature", "none"] = "temperature"
    # The export's out-of-distribution score (Mahalanobis distance of the embedding to the nearest
    # training class); its threshold rejects this share of the validation images.
    ood: Literal["mahalanobis", "none"] = "mahalanobis"
    ood_false_rejection_rate: float = Field(0.01, ge=0, lt=1)


class GateRule(_Section):
    """One rule of the evaluation gate: `metric` compared with `threshold`.

    `metric` names a value of the evaluation (accuracy, macro_f1, macro_roc_auc, ece,
    recall:<class>, precision:<class>, f1:<class>, specificity:<class>). `bound` chooses the point
    estimate or the bootstrap lower/upper confidence bound. With `per` (a slice column of the
    evaluation: site, manufacturer, model, source_folder, a metadata-table column), the rule binds
    the worst slice among those with at least `min_cases` test images.
    """

    metric: str
    op: Literal[">=", "<="] = ">="
    threshold: float
    bound: Literal["point", "lower", "upper"] = "point"
    per: str = ""
    min_cases: int = Field(0, ge=0)


class ChampionRule(_Section):
    """Non-inferiority against the champion: challenger >= champion - margin (or better by `min_gain`)."""

    metric: str
    margin: float = Field(0.01, ge=0)
    # When set, the challenger must beat the champion by at least this much on this metric.
    min_gain: float | None = None
    higher_is_better: bool = True
    # point: the challenger's point value against the champion's. lower: the lower bound of the
    # paired bootstrap CI of challenger - champion must stay above -margin (a non-inferiority test).
    bound: Literal["point", "lower"] = "point"


class ExternalSetConfig(_Section):
    """An external-site dataset (docs/external_sets.md): downloaded and validated like the
    training data, never trained on, all of it scored by challenger and champion. It takes the
    run's dataset section with its own `source` (any the download step takes), folder and label
    mapping; `rules` (floors) and `champion_rules` (non-inferiority) gate on it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    source: str
    # The folder holding the class folders and the folder-to-label map; unset: the run's.
    subdir: str | None = None
    class_map: dict[str, str] | None = None
    # For `source: phantom`: the generator settings (another seed or noise: another "site").
    phantom: PhantomConfig | None = None
    rules: list[GateRule] = Field(default_factory=list)
    champion_rules: list[ChampionRule] = Field(default_factory=list)

    def dataset(self, run_dataset: DatasetConfig) -> DatasetConfig:
        """The dataset section this set is downloaded and validated with: the run's, with this
        set's source, folder and labels (no predefined split folders: all of it is held out)."""
        return run_dataset.model_copy(
            update={
                "name": f"{run_dataset.name}-external-{self.name}",
                "source": self.source,
                "subdir": run_dataset.subdir if self.subdir is None else self.subdir,
                "class_map": run_dataset.class_map if self.class_map is None else self.class_map,
                "split_dirs": {},
                "phantom": self.phantom or run_dataset.phantom,
            }
        )


class GateConfig(_Section):
    rules: list[GateRule] = Field(
        default_factory=lambda: [
            GateRule(metric="accuracy", threshold=0.80),
            GateRule(metric="macro_f1", threshold=0.80),
            GateRule(metric="recall:tumor", threshold=0.80),
        ]
    )
    champion_rules: list[ChampionRule] = Field(
        default_factory=lambda: [
            ChampionRule(metric="macro_f1", margin=0.02),
            ChampionRule(metric="recall:tumor", margin=0.02),
        ]
    )
    bootstrap_resamples: int = Field(500, ge=0)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 7
    approval: Literal["auto", "manual"] = "auto"
    approval_timeout_s: float = Field(3600.0, gt=0)
    approval_poll_s: float = Field(5.0, gt=0)
    # External-site sets (ExternalSetConfig), and the drop of `external_drop_metric` from the
    # internal test split to an external set above which the review and report warn.
    external_sets: list[ExternalSetConfig] = Field(default_factory=list)
    external_drop_metric: str = "macro_f1"
    external_max_drop: float = Field(0.10, ge=0)

    @field_validator("external_sets")
    @classmethod
    def _unique_external_names(cls, value: list[ExternalSetConfig]) -> list[ExternalSetConfig]:
        names = [external.name for external in value]
        if len(set(names)) != len(names):
            raise ValueError(f"gate.external_sets names must be unique: {names}")
        return value


class DeployConfig(_Section):
    model_name: str = "kidney-ct"
    # Where TF Serving reads `<model_base_path>/<model_name>/<version>/`; local path or gs://.
    # Empty: `<run_root>/serving/models`.
    model_base_path: str = ""
    # TF Serving version policy written to models.config: serve the latest N versions.
    keep_versions: int = Field(2, ge=1)
    # stable: a deployed version becomes `stable` (and `champion`) at once. canary: it is served
    # under the `canary` label beside `stable` until `tumorflow promote`.
    rollout: Literal["stable", "canary"] = "stable"


class TrackingConfig(_Section):
    # Empty: a SQLite store inside the run folder (`<run_root>/mlflow.db`).
    tracking_uri: str = ""
    experiment: str = "tumorflow"


class DriftConfig(_Section):
    # Share of drifted feature columns at or above which the dataset counts as drifted.
    drift_share: float = Field(0.3, gt=0, le=1)
    # PCA components of the model's embedding in the drift reference (0: no embedding columns).
    embedding_components: int = Field(8, ge=0, le=64)
    # Share of served requests `tumorflow serve --request_log_dir` logs (its default sample rate).
    request_sample_rate: float = Field(1.0, ge=0, le=1)
    # Recent window (hours) that `tumorflow monitor` checks.
    window_hours: float = Field(24.0, gt=0)


class RuntimeConfig(_Section):
    """How the compiled pipeline runs on a cluster (ignored by kfp.local, kept in the YAML)."""

    image: str = "ghcr.io/tumorflow/tumorflow-python:0.1.0"
    accelerator_type: str = "NVIDIA_L4"
    accelerator_count: int = Field(1, ge=0)
    train_cpu: str = "8"
    train_memory: str = "32G"
    # Where the compiled pipeline runs: Vertex AI Pipelines, or Kubeflow Pipelines (on GKE).
    target: Literal["vertex", "kubeflow"] = "vertex"
    # Training replicas (machines): >1 runs training as a multi-worker job, each replica with the
    # accelerators above: on Vertex AI a custom job of `machine_type` machines, on Kubeflow a
    # Training Operator TFJob (pipelines/cluster_training.py).
    workers: int = Field(1, ge=1)
    machine_type: str = "g2-standard-8"
    # Kubeflow on GKE: the training pod gets the GPU node pool's node selector and toleration.
    gke_gpu_pool: bool = False
    # Kubeflow: Kubernetes Secrets mounted into the approval and deploy pods (docs/signing.md):
    # the trust root (key `trust_root.yaml`) and the pipeline's signing key (key `pipeline`); an
    # empty release.trust_root / release.pipeline_key then names the mounted file.
    trust_root_secret: str = ""
    pipeline_key_secret: str = ""
    # The bucket a cluster run keeps its models and checkpoints in, unless deploy.model_base_path
    # or checkpoint_root say otherwise.
    bucket: str = "gs://tumorflow-models"
    # Per-epoch checkpoints, so a retried training resumes; a mounted path (Vertex AI mounts
    # gs://B as /gcs/B). Empty: `<run_root>/checkpoints` locally, `/gcs/<bucket>/checkpoints` on a
    # cluster.
    checkpoint_root: str = ""

    @field_validator("bucket")
    @classmethod
    def _bucket_is_gs(cls, value: str) -> str:
        if not value.startswith("gs://") or len(value.rstrip("/")) <= len("gs://"):
            raise ValueError("runtime.bucket must be a gs://BUCKET URI")
        return value.rstrip("/")


class ConsoleConfig(_Section):
    """The review console (`tumorflow ui`): where it listens, who may do what, how it knows who."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Links to a run's review page start with this (the approval step's Markdown, say).
    base_url: str = "http://127.0.0.1:8080"
    # token: per-user sign-in tokens (`tokens`). proxy: the identity an authenticating proxy
    # (IAP, oauth2-proxy) puts into `proxy_header`; a request without it is refused.
    auth: Literal["token", "proxy"] = "token"
    proxy_header: str = "X-Forwarded-Email"
    # user -> sha256 (hex) of that user's sign-in token; never the token itself.
    tokens: dict[str, str] = Field(default_factory=dict)
    # model name (or "*": every model) -> role (viewer | approver | rollback) -> users.
    roles: dict[str, dict[Literal["viewer", "approver", "rollback"], list[str]]] = Field(
        default_factory=dict
    )
    # The gRPC address of the model server "Try a scan" asks.
    model_server: str = "127.0.0.1:8500"
    # Append-only audit log (JSON lines). Empty: `<run_root>/audit.jsonl`, beside the registry.
    audit_log: str = ""
    # The console's delegate key: it signs decisions for the user the console authenticated
    # (docs/signing.md). Empty: `<run_root>/keys/console`, made with the local trust root.
    signing_key: str = ""

    def review_url(self, pipeline_run: str) -> str:
        """The console's review page of a run, for links from outside it (the approval step)."""
        return f"{self.base_url.rstrip('/')}/runs/{pipeline_run}"


class RouteConfig(_Section):
    """`tumorflow route` (docs/pacs.md): watch a PACS for new images, classify each with the
    model server, store the result back as a DICOM SR (and optionally a Grad-CAM capture)."""

    # The PACS's DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), e.g. http://pacs:8042/dicom-web.
    dicomweb_url: str = ""
    # How new instances are found: Orthanc's changes feed (`/changes?since=N` on its REST root),
    # or QIDO-RS polling of the studies of the last `lookback_days` (any DICOMweb server).
    watch: Literal["orthanc-changes", "qido"] = "qido"
    # Orthanc's REST root for the changes feed. Empty: dicomweb_url without its last segment.
    orthanc_url: str = ""
    # Extra study-level QIDO-RS filters of the polling (e.g. {StudyDescription: "ABDOMEN*"}).
    query: dict[str, str] = Field(default_factory=dict)
    lookback_days: int = Field(1, ge=0)
    # Only instances of these modalities are classified (the results, SR and OT, never are).
    modalities: list[str] = Field(default_factory=lambda: ["CT", "MR"])
    # Login and limits of the PACS (auth, credentials, retries, backoff, timeout, page size).
    pacs: DicomWebConfig = Field(default_factory=DicomWebConfig)
    # The model server's gRPC address, and which model: empty model_name is deploy.model_name.
    model_server: str = "127.0.0.1:8500"
    model_name: str = ""
    version_label: str = ""
    # Where the served versions live (deploy.model_base_path): the serving digest written into
    # each result is read there. Empty: deploy's.
    model_base_path: str = ""
    timeout_seconds: float = Field(30.0, gt=0)
    # Images sent to the model server per request.
    batch_size: int = Field(8, ge=1, le=256)
    # Also store a Secondary Capture of the Grad-CAM overlay (the model's explain signature).
    secondary_capture: bool = False
    # Seconds between passes of the long-running service.
    poll_seconds: float = Field(10.0, gt=0)
    # The router's state (change cursor, done, pending, skipped, dead letters). Empty:
    # `<run_root>/route/state.json`.
    state_file: str = ""
    # Prometheus metrics endpoint (0: none); the address it binds.
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"


class ReleaseConfig(_Section):
    """Signed release decisions (docs/signing.md): the trust root, and the keys that sign."""

    # Who may sign what for which model (YAML; a path or gs:// URI; in a cluster, a mounted
    # Secret). Empty: `<run_root>/trust_root.yaml`, made with throwaway keys on first local use.
    trust_root: str = ""
    # The private key `tumorflow approve|reject|rollback|promote` sign with (OpenSSH Ed25519;
    # an encrypted or agent-held key signs through ssh-keygen).
    signing_key: str = "~/.ssh/id_ed25519"
    # The pipeline's own key, which signs automatic approvals (policy auto, gate passed) only.
    # Empty: `<run_root>/keys/pipeline`, made with the local trust root.
    pipeline_key: str = ""


class PipelineConfig(_Section):
    """Everything a retraining run needs; each step gets only its section."""

    # Local folder holding kfp.local's pipeline root, the MLflow store and the serving models.
    run_root: str = "runs"
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)

    @field_validator("run_root")
    @classmethod
    def _run_root_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("run_root must name a folder")
        return value

    def resolved_tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{(Path(self.run_root) / 'mlflow.db').resolve()}"

    def cluster_tracking_uri(self, *, no_registry: bool = False) -> str:
        """The tracking URI a cluster run gets. A cluster run without a registry cannot find the
        champion and would gate against nothing, so an empty one is refused unless the caller
        says `no_registry` (then "" and the gate runs the absolute rules only)."""
        uri = self.tracking.tracking_uri
        if not uri and not no_registry:
            raise ConfigError(
                "a cluster run needs an MLflow tracking server to find the champion: set "
                "tracking.tracking_uri (--set tracking.tracking_uri=http://mlflow:5000), or pass "
                "--no-registry to gate on the absolute rules only"
            )
        if uri.startswith("sqlite:") or uri.startswith("file:"):
            raise ConfigError(
                f"tracking.tracking_uri {uri!r} is a file on this machine, which a cluster cannot "
                "read: point it at an MLflow server (http://...)"
            )
        return uri

    def resolved_model_base_path(self, *, local: bool = True) -> str:
        """Where deploy writes versions: deploy.model_base_path, else `<run_root>/serving/models`
        locally or `<runtime.bucket>/serving` on a cluster."""
        if self.deploy.model_base_path:
            return self.deploy.model_base_path
        if not local:
            return f"{self.runtime.bucket}/serving"
        return str((Path(self.run_root) / "serving" / "models").resolve())

    def resolved_trust_root(self) -> str:
        """release.trust_root, else `<run_root>/trust_root.yaml` (absolute)."""
        return self.release.trust_root or str((Path(self.run_root) / "trust_root.yaml").resolve())

    def resolved_pipeline_key(self) -> str:
        return self.release.pipeline_key or str(
            (Path(self.run_root) / "keys" / "pipeline").resolve()
        )

    def resolved_console_key(self) -> str:
        return self.console.signing_key or str((Path(self.run_root) / "keys" / "console").resolve())

    def resolved_route_state(self) -> str:
        """route.state_file, else `<run_root>/route/state.json`."""
        return self.route.state_file or str(
            (Path(self.run_root) / "route" / "state.json").resolve()
        )

    def resolved_audit_log(self) -> str:
        """console.audit_log, else `<run_root>/audit.jsonl`: the chained log of decisions."""
        return self.console.audit_log or str((Path(self.run_root) / "audit.jsonl").resolve())

    def resolved_checkpoint_root(self, *, local: bool = True) -> str:
        if self.runtime.checkpoint_root:
            return self.runtime.checkpoint_root
        if not local:
            return f"/gcs/{self.runtime.bucket.removeprefix('gs://')}/checkpoints"
        return str((Path(self.run_root) / "checkpoints").resolve())


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """Turn `train.stage1.epochs=3` into `{"train": {"stage1": {"epochs": 3}}}` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.field=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> PipelineConfig:
    """Defaults, then a preset, then a YAML file, then `key=value` overrides, validated once."""
    data: dict[str, Any] = {}
    if preset:
        preset_path = PRESETS_DIR / f"{preset}.yaml"
        if not preset_path.exists():
            raise ConfigError(
                f"unknown dataset preset {preset!r}; choose one of: {', '.join(list_presets())}"
            )
        data = _deep_merge(data, _read_yaml(preset_path))
    if path:
        data = _deep_merge(data, _read_yaml(Path(path)))
    for override in overrides or []:
        data = _deep_merge(data, parse_override(override))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
