"""The evaluation gate: absolute rules, champion/challenger on the same test images, bootstrap CIs.

The decision is data (decision.json, the "blessing" that deploy consumes) plus a Markdown report
for the pipeline UI. The champion is the registry's `champion` version, re-evaluated here through
its served SavedModel signature on the challenger's test split, so both models are measured on the
same images by the same code path as production.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tumorflow.components.evaluate import ECE_BINS
from tumorflow.core.config import ChampionRule, GateConfig, GateRule
from tumorflow.core.errors import GateError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

GLOBAL_METRICS = ("accuracy", "macro_f1", "macro_roc_auc", "ece")
CLASS_STATS = ("precision", "recall", "f1", "sensitivity", "specificity")
LOWER_IS_BETTER = frozenset({"ece"})
PREDICT_BATCH = 64


def metric_names(classes: list[str]) -> list[str]:
    """Every metric name a rule may use for these classes."""
    return [*GLOBAL_METRICS, *(f"{stat}:{c}" for stat in CLASS_STATS for c in classes)]


def check_metric(name: str, classes: list[str]) -> None:
    """Raise GateError naming the valid metrics when `name` is not one of them."""
    if name not in metric_names(classes):
        raise GateError(
            f"unknown gate metric {name!r}; valid names: {', '.join(metric_names(classes))}"
        )


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """The value of a named metric in a metrics.json dict."""
    check_metric(name, list(metrics["classes"]))
    if ":" in name:
        stat, label = name.split(":", 1)
        value = metrics["per_class"][label][stat]
    else:
        value = metrics[name]
    # macro_roc_auc is null when the test split lacks a class: a rule on it then fails.
    return float("nan") if value is None else float(value)


def _bootstrap_block(y: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Metrics of a block of resamples: y [R, n] labels, probs [R, n, C]; each value is [R]."""
    from scipy.stats import rankdata

    n_rows, n, n_classes = probs.shape
    pred = probs.argmax(axis=2)
    truth = y[..., None] == np.arange(n_classes)
    guess = pred[..., None] == np.arange(n_classes)
    tp = (truth & guess).sum(axis=1).astype(float)
    fp = (~truth & guess).sum(axis=1)
    fn = (truth & ~guess).sum(axis=1)
    tn = n - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = {
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
            "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), 0.0),
        }
    stats["sensitivity"] = stats["recall"]
    values: dict[str, np.ndarray] = {}
    for name in names:
        if name == "accuracy":
            values[name] = (pred == y).mean(axis=1)
        elif name == "macro_f1":
            values[name] = stats["f1"].mean(axis=1)
        elif name == "macro_roc_auc":
            n_pos = truth.sum(axis=1).astype(float)
            aucs = np.empty((n_rows, n_classes))
            for c in range(n_classes):
                ranks = rankdata(probs[..., c], axis=1)
                rank_sum = (ranks * truth[..., c]).sum(axis=1)
                pos = n_pos[:, c]
                with np.errstate(invalid="ignore", divide="ignore"):
                    aucs[:, c] = (rank_sum - pos * (pos + 1) / 2) / (pos * (n - pos))
            with np.errstate(invalid="ignore"):
                values[name] = np.nanmean(np.where(np.isfinite(aucs), aucs, np.nan), axis=1)
        elif name == "ece":
            confidence = probs.max(axis=2)
            correct = (pred == y).astype(float)
            bins = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
            offsets = bins + ECE_BINS * np.arange(n_rows)[:, None]
            size = n_rows * ECE_BINS
            gap = np.bincount(offsets.ravel(), correct.ravel(), size) - np.bincount(
                offsets.ravel(), confidence.ravel(), size
            )
            values[name] = np.abs(gap.reshape(n_rows, ECE_BINS)).sum(axis=1) / n
        else:
            stat, label_index = name.split(":", 1)
            values[name] = stats[stat][:, int(label_index)]
    return values


def bootstrap_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    names: list[str],
    indices: np.ndarray,
) -> dict[str, np.ndarray]:
    """Each named metric over bootstrap resamples of the rows (vectorised numpy).

    `indices` [resamples, n] come from `bootstrap_indices`; the same indices resample two models'
    scores of the same images identically (a paired bootstrap).
    """
    for name in names:
        check_metric(name, classes)
    n = len(y_true)
    internal = [
        name if ":" not in name else f"{name.split(':')[0]}:{classes.index(name.split(':')[1])}"
        for name in names
    ]
    block = max(1, 4_000_000 // max(1, n * probs.shape[1]))
    parts = [
        _bootstrap_block(
            y_true[indices[start : start + block]], probs[indices[start : start + block]], internal
        )
        for start in range(0, len(indices), block)
    ]
    return {
        name: np.concatenate([p[key] for p in parts])
        for name, key in zip(names, internal, strict=True)
    }


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def confidence_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN resamples, e.g. a class absent, ignored)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class ChampionEvaluation:
    """The champion re-scored on the challenger's test split."""

    version: str | None
    serving_version: str | None
    classes: list[str]
    metrics: dict[str, Any]
    probs: np.ndarray
    y_true: np.ndarray
    paths: list[str]


@dataclass
class RuleResult:
    name: str
    kind: str  # absolute | champion
    metric: str
    op: str
    threshold: float
    bound: str
    value: float
    champion_value: float | None
    ci: tuple[float, float] | None
    passed: bool
    detail: str


@dataclass
class GateDecision:
    passed: bool
    rules: list[RuleResult]
    classes: list[str]
    champion_version: str | None
    champion_serving_version: str | None
    challenger: dict[str, float]
    champion: dict[str, float] | None
    bootstrap: dict[str, Any]
    confusion_matrices: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    decided_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_predictions(predictions: pd.DataFrame | Path | str, classes: list[str]) -> pd.DataFrame:
    frame = predictions if isinstance(predictions, pd.DataFrame) else pd.read_csv(predictions)
    missing = [c for c in ["label_index", *(f"p_{c}" for c in classes)] if c not in frame.columns]
    if missing:
        raise GateError(f"predictions lack columns {missing}; re-run the evaluate step")
    return frame


def _absolute_rule(
    rule: GateRule, metrics: dict, cis: dict[str, tuple[float, float]], confidence: float
) -> RuleResult:
    point = metric_value(metrics, rule.metric)
    ci = cis.get(rule.metric)
    if rule.bound == "point":
        value = point
    elif ci is None:
        raise GateError(
            f"rule on the {rule.bound} bound of {rule.metric} needs bootstrap resamples; "
            "set gate.bootstrap_resamples above 0"
        )
    else:
        value = ci[0] if rule.bound == "lower" else ci[1]
    passed = bool(value >= rule.threshold if rule.op == ">=" else value <= rule.threshold)
    what = "point estimate" if rule.bound == "point" else f"{rule.bound} {confidence:.0%} bound"
    return RuleResult(
        name=f"{rule.metric} {rule.op} {rule.threshold:g} ({rule.bound})",
        kind="absolute",
        metric=rule.metric,
        op=rule.op,
        threshold=rule.threshold,
        bound=rule.bound,
        value=value,
        champion_value=None,
        ci=ci,
        passed=passed,
        detail=f"{what} {value:.4f} {rule.op} {rule.threshold:g}",
    )


def _champion_rule(
    rule: ChampionRule,
    metrics: dict,
    champion: ChampionEvaluation,
    diff_ci: tuple[float, float] | None,
) -> RuleResult:
    value = metric_value(metrics, rule.metric)
    base = metric_value(champion.metrics, rule.metric)
    higher = rule.higher_is_better and rule.metric not in LOWER_IS_BETTER
    sign = 1.0 if higher else -1.0
    if rule.min_gain is not None:
        threshold = base + sign * rule.min_gain
        kind = f"better than champion by {rule.min_gain:g}"
    else:
        threshold = base - sign * rule.margin
        kind = f"non-inferior to champion (margin {rule.margin:g})"
    op = ">=" if higher else "<="
    passed = bool(value >= threshold if higher else value <= threshold)
    return RuleResult(
        name=f"{rule.metric}: {kind}",
        kind="champion",
        metric=rule.metric,
        op=op,
        threshold=threshold,
        bound="point",
        value=value,
        champion_value=base,
        ci=diff_ci,
        passed=passed,
        detail=f"challenger {value:.4f} {op} {threshold:.4f} (champion {base:.4f})",
    )


def _aligned_champion(
    champion: ChampionEvaluation, frame: pd.DataFrame, classes: list[str]
) -> np.ndarray | None:
    """Champion scores in the challenger's row and class order, or None when not comparable."""
    if sorted(champion.classes) != sorted(classes):
        return None
    order = [champion.classes.index(c) for c in classes]
    probs = champion.probs[:, order]
    if "path" in frame.columns and len(set(champion.paths)) == len(champion.paths):
        position = {p: i for i, p in enumerate(champion.paths)}
        if not all(p in position for p in frame["path"]):
            return None
        return probs[[position[p] for p in frame["path"]]]
    return probs if len(probs) == len(frame) else None


def evaluate_gate(
    metrics: dict[str, Any],
    predictions: pd.DataFrame | Path | str,
    gate: GateConfig,
    champion: ChampionEvaluation | None,
) -> GateDecision:
    """Apply the absolute and champion/challenger rules; the decision passes only if all pass."""
    classes = list(metrics["classes"])
    for rule in [*gate.rules, *gate.champion_rules]:
        check_metric(rule.metric, classes)
    frame = read_predictions(predictions, classes)
    y_true = frame["label_index"].to_numpy(dtype=int)
    probs = frame[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    # ECE is always reported (calibration), gated or not.
    gated = sorted(
        {r.metric for r in gate.rules} | {r.metric for r in gate.champion_rules} | {"ece"}
    )
    notes: list[str] = []
    indices = bootstrap_indices(len(y_true), gate.bootstrap_resamples, gate.seed)
    cis: dict[str, tuple[float, float]] = {}
    samples: dict[str, np.ndarray] = {}
    if gate.bootstrap_resamples > 0 and len(y_true) > 0:
        samples = bootstrap_metrics(y_true, probs, classes, gated, indices)
        cis = {
            name: confidence_interval(values, gate.confidence) for name, values in samples.items()
        }
    results = [_absolute_rule(rule, metrics, cis, gate.confidence) for rule in gate.rules]
    champion_values = None
    if champion is None:
        notes.append("No champion in the registry yet: absolute rules only.")
    else:
        champion_probs = _aligned_champion(champion, frame, classes)
        if champion_probs is None:
            notes.append(
                f"The champion (classes {champion.classes}) was not scored on the same images and "
                f"classes as the challenger ({classes}): not comparable; approve with --override "
                "to replace it anyway."
            )
            results.append(
                RuleResult(
                    "champion comparable",
                    "champion",
                    "classes",
                    "==",
                    0.0,
                    "point",
                    float("nan"),
                    None,
                    None,
                    False,
                    notes[-1],
                )
            )
        else:
            champion_values = {name: metric_value(champion.metrics, name) for name in gated}
            diffs: dict[str, tuple[float, float]] = {}
            if samples:
                theirs = bootstrap_metrics(y_true, champion_probs, classes, gated, indices)
                diffs = {
                    name: confidence_interval(samples[name] - theirs[name], gate.confidence)
                    for name in gated
                }
            results += [
                _champion_rule(rule, metrics, champion, diffs.get(rule.metric))
                for rule in gate.champion_rules
            ]
    return GateDecision(
        passed=all(r.passed for r in results),
        rules=results,
        classes=classes,
        champion_version=champion.version if champion else None,
        champion_serving_version=champion.serving_version if champion else None,
        challenger={name: metric_value(metrics, name) for name in gated},
        champion=champion_values,
        bootstrap={
            "resamples": gate.bootstrap_resamples,
            "confidence": gate.confidence,
            "seed": gate.seed,
            "intervals": {name: list(ci) for name, ci in cis.items()},
        },
        confusion_matrices={
            "challenger": metrics.get("confusion_matrix"),
            "champion": champion.metrics.get("confusion_matrix") if champion_values else None,
        },
        notes=notes,
    )


def _fmt(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.4f}"


def markdown_report(decision: GateDecision) -> str:
    """The gate report for the pipeline UI: every rule, both models' values, CI, PASS/FAIL."""
    verdict = "PASSED" if decision.passed else "FAILED"
    lines = [f"# Evaluation gate: {verdict}", ""]
    if decision.champion_version is not None:
        lines.append(
            f"Champion: registry version {decision.champion_version} (served version "
            f"{decision.champion_serving_version}), re-evaluated on the challenger's test images."
        )
    lines += [f"> {note}" for note in decision.notes]
    confidence = decision.bootstrap["confidence"]
    lines += [
        "",
        f"| rule | challenger | {confidence:.0%} CI | champion | threshold | result |",
        "|---|---|---|---|---|---|",
    ]
    for rule in decision.rules:
        ci = "–" if rule.ci is None else f"[{_fmt(rule.ci[0])}, {_fmt(rule.ci[1])}]"
        if rule.kind == "champion" and rule.ci is not None:
            ci = f"Δ {ci}"
        lines.append(
            f"| {rule.name} | {_fmt(rule.value)} | {ci} | {_fmt(rule.champion_value)} | "
            f"{rule.op} {_fmt(rule.threshold)} | {'PASS' if rule.passed else '**FAIL**'} |"
        )
    intervals = decision.bootstrap["intervals"]
    if intervals:
        lines += [
            "",
            f"Bootstrap: {decision.bootstrap['resamples']} resamples (seed "
            f"{decision.bootstrap['seed']}); champion rules show the paired CI of challenger − champion.",
            "",
            "| metric | challenger | CI | champion |",
            "|---|---|---|---|",
        ]
        for name, (low, high) in intervals.items():
            theirs = (decision.champion or {}).get(name)
            lines.append(
                f"| {name} | {_fmt(decision.challenger[name])} | [{_fmt(low)}, {_fmt(high)}] | {_fmt(theirs)} |"
            )
    lines += ["", "## Calibration", ""]
    lines.append(
        f"Expected calibration error ({ECE_BINS} bins): challenger {_fmt(decision.challenger.get('ece'))}"
        + (f", champion {_fmt(decision.champion.get('ece'))}" if decision.champion else "")
        + ". Reliability diagram: `reliability.png` in the decision artifact."
    )
    for who in ("challenger", "champion"):
        matrix = decision.confusion_matrices.get(who)
        if matrix:
            lines += ["", f"## Confusion matrix: {who} (rows true, columns predicted)", ""]
            lines.append("| | " + " | ".join(decision.classes) + " |")
            lines.append("|---" * (len(decision.classes) + 1) + "|")
            lines += [
                f"| {label} | " + " | ".join(str(int(v)) for v in row) + " |"
                for label, row in zip(decision.classes, matrix, strict=True)
            ]
    return "\n".join(lines) + "\n"


def evaluate_champion(
    saved_model_dir: Path,
    split_dir: Path,
    *,
    version: str | None = None,
    serving_version: str | None = None,
) -> ChampionEvaluation:
    """Score the test split with a served SavedModel's `serving_default` (the encoded bytes)."""
    import tensorflow as tf

    from tumorflow.components.evaluate import compute_metrics
    from tumorflow.components.export import SIGNATURE
    from tumorflow.components.tfrecords import read_records, read_split_manifest

    classes = list(read_split_manifest(split_dir)["classes"])
    served = tf.saved_model.load(str(saved_model_dir)).signatures[SIGNATURE]
    records = list(read_records(split_dir, "test"))
    if not records:
        raise GateError(f"the test split of {split_dir} is empty: the champion cannot be scored")
    scores, served_classes = [], None
    for start in range(0, len(records), PREDICT_BATCH):
        chunk = records[start : start + PREDICT_BATCH]
        out = served(image_bytes=tf.constant([r.encoded for r in chunk]))
        scores.append(out["scores"].numpy())
        served_classes = [c.decode() for c in out["classes"].numpy()[0]]
    probs = np.concatenate(scores).astype(float)
    y_true = np.array([r.label for r in records])
    paths = [r.path for r in records]
    if sorted(served_classes) != sorted(classes):
        log.warning("champion classes %s differ from the split's %s", served_classes, classes)
        return ChampionEvaluation(
            version, serving_version, served_classes, {}, probs, y_true, paths
        )
    probs = probs[:, [served_classes.index(c) for c in classes]]
    metrics = compute_metrics(y_true, probs, classes)
    return ChampionEvaluation(version, serving_version, classes, metrics, probs, y_true, paths)


def champion_saved_model(tracking_uri: str, model_version: ModelVersion, work_dir: Path) -> Path:
    """A local copy of the champion's served SavedModel.

    The served folder recorded at deploy (`serving_path` tag) is used when it still exists;
    otherwise the registered model folder is downloaded and exported again.
    """
    from tumorflow.components.export import export_serving_model
    from tumorflow.components.registry import TAG_SERVING_PATH, connect, download_model_folder
    from tumorflow.core import storage

    served = model_version.tags.get(TAG_SERVING_PATH)
    if served and storage.exists(storage.join(served, "saved_model.pb")):
        if not storage.is_remote(served):
            return Path(served)
        storage.download_tree(served, work_dir / "served")
        return work_dir / "served"
    folder = download_model_folder(connect(tracking_uri), model_version)
    export_serving_model(folder, work_dir / "exported", model_name=model_version.name)
    return work_dir / "exported"


def write_decision(decision: GateDecision, out_dir: Path) -> Path:
    """Write decision.json and report.md into `out_dir`; return the decision.json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "decision.json"
    path.write_text(json.dumps(decision.to_dict(), indent=2, default=_json_default))
    (out_dir / "report.md").write_text(markdown_report(decision))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to decision.json")


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Reliability diagram (accuracy against confidence per bin) of each model on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, ECE_BINS + 1)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for label, (y_true, probs) in curves.items():
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == y_true
        bins = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
        used = [b for b in range(ECE_BINS) if np.any(bins == b)]
        axis.plot(
            [confidence[bins == b].mean() for b in used],
            [correct[bins == b].mean() for b in used],
            marker="o",
            label=label,
        )
    axis.set(xlim=(0, 1), ylim=(0, 1), xticks=edges[::3], xlabel="confidence", ylabel="accuracy")
    axis.set_title("Reliability")
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@dataclass
class GateRunResult:
    """What the gate step produced: the decision, its report, and where they were written."""

    decision: GateDecision
    markdown: str
    decision_path: Path

    @property
    def passed(self) -> bool:
        return self.decision.passed

    def log_champion_classification(self, artifact: Any) -> None:
        """Log the champion's confusion matrix to a KFP ClassificationMetrics artifact."""
        matrix = self.decision.confusion_matrices.get("champion")
        if matrix:
            artifact.log_confusion_matrix(self.decision.classes, matrix)


def run_gate(
    evaluation_dir: Path,
    split_dir: Path,
    gate: GateConfig,
    *,
    tracking_uri: str | None,
    model_name: str,
    output_dir: Path,
) -> GateRunResult:
    """The gate step: find and re-score the champion, apply the rules, write the decision."""
    from tumorflow.components.registry import TAG_SERVING_VERSION, find_champion

    evaluation_dir = Path(evaluation_dir)
    metrics_path = evaluation_dir / "metrics.json"
    if not metrics_path.exists():
        raise GateError(f"{evaluation_dir} has no metrics.json; run the evaluate step first")
    metrics = json.loads(metrics_path.read_text())
    champion = None
    model_version = find_champion(tracking_uri, model_name) if tracking_uri else None
    if model_version is not None:
        work_dir = Path(tempfile.mkdtemp(prefix="tumorflow-champion-"))
        try:
            champion = evaluate_champion(
                champion_saved_model(tracking_uri, model_version, work_dir),
                split_dir,
                version=model_version.version,
                serving_version=model_version.tags.get(TAG_SERVING_VERSION),
            )
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    predictions = read_predictions(evaluation_dir / "predictions.csv", list(metrics["classes"]))
    decision = evaluate_gate(metrics, predictions, gate, champion)
    decision_path = write_decision(decision, output_dir)
    classes = decision.classes
    curves = {
        "challenger": (
            predictions["label_index"].to_numpy(dtype=int),
            predictions[[f"p_{c}" for c in classes]].to_numpy(dtype=float),
        )
    }
    if champion is not None and champion.metrics:
        curves[f"champion (v{champion.version})"] = (champion.y_true, champion.probs)
    plot_reliability(curves, Path(output_dir) / "reliability.png")
    log.info("gate %s (%d rules)", "passed" if decision.passed else "failed", len(decision.rules))
    return GateRunResult(decision, markdown_report(decision), decision_path)
