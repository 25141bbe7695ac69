"""The gate's rules, pure: metric values and bootstrap CIs in, rule results and the decision out.

Absolute rules compare a point estimate or a CI bound with a threshold; a rule `per` a slice
column (site, scanner, ...) binds the worst slice with at least `min_cases` images. Champion rules compare
the challenger with the champion re-scored on the same test images (non-inferiority within a
margin, or a minimum gain), with the paired bootstrap CI of challenger − champion reported.
No TensorFlow, no MLflow, no files: `gate.run_gate` gathers the inputs and writes the outputs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tumorflow.components.evaluation.metrics import (
    Predictions,
    bootstrap_indices,
    bootstrap_metrics,
    check_metric,
    confidence_interval,
    defined_metric_values,
    metric_value,
)
from tumorflow.core.config import ChampionRule, ExternalSetConfig, GateConfig, GateRule
from tumorflow.core.errors import GateError

LOWER_IS_BETTER = frozenset({"ece"})


@dataclass
class ChampionEvaluation:
    """The champion re-scored on the challenger's test split (`metrics` is {} when its classes
    differ from the split's)."""

    version: str | None
    serving_version: str | None
    predictions: Predictions
    metrics: dict[str, Any]
    # the champion on each external set, by name (components/data/external_sets.py)
    external: dict[str, ChampionEvaluation] = field(default_factory=dict)


@dataclass
class ExternalScores:
    """The challenger on one external set: evaluate's metrics and predictions of it."""

    metrics: dict[str, Any]
    predictions: Predictions


@dataclass
class RuleResult:
    name: str
    kind: str  # absolute | slice | champion | external
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
    challenger_saved_model_sha256: str | None = None
    # {column: {value: {"n", "values": {metric: point}, "intervals": {metric: [low, high]}}}}
    slices: dict[str, Any] = field(default_factory=dict)
    # {name: {"n", "values", "intervals", "champion", "internal", "drop", "warning"}}
    external_sets: dict[str, Any] = field(default_factory=dict)
    # measured reasons for a reviewer's attention that fail no rule (an external set's drop)
    warnings: list[str] = field(default_factory=list)
    decided_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def absolute_rule(
    rule: GateRule, metrics: dict[str, Any], cis: dict[str, tuple[float, float]], confidence: float
) -> RuleResult:
    """A threshold on the point estimate or on the lower/upper bound of the bootstrap CI."""
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


def slice_summary(
    predictions: Predictions, names: list[str], gate: GateConfig
) -> dict[str, dict[str, dict[str, Any]]]:
    """Images, point values and bootstrap CIs of `names` on every slice of every slice column
    (metrics undefined on a slice, e.g. the recall of a class it has no images of, left out)."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for column in predictions.slices:
        summary[column] = {}
        for value, rows in predictions.slice_rows(column).items():
            part = predictions.subset(rows)
            values = defined_metric_values(part.y_true, part.probs, part.classes, names)
            defined = [name for name in names if np.isfinite(values[name])]
            intervals: dict[str, list[float]] = {}
            if gate.bootstrap_resamples > 0 and defined:
                indices = bootstrap_indices(len(rows), gate.bootstrap_resamples, gate.seed)
                samples = bootstrap_metrics(part.y_true, part.probs, part.classes, defined, indices)
                intervals = {
                    name: list(confidence_interval(samples[name], gate.confidence))
                    for name in defined
                }
            summary[column][value] = {
                "n": len(rows),
                "values": {name: values[name] for name in defined},
                "intervals": intervals,
            }
    return summary


def slice_rule(
    rule: GateRule, slices: dict[str, dict[str, dict[str, Any]]], confidence: float
) -> RuleResult:
    """The rule on every slice of `rule.per` with at least `rule.min_cases` images: the worst
    slice decides. With no such slice there is nothing to bind and the rule passes (said so)."""
    if rule.per not in slices:
        raise GateError(
            f"gate rule {rule.metric} per {rule.per!r}: the evaluation has no slice column "
            f"{rule.per!r} (it has: {', '.join(slices) or 'none, the split has no slices.csv'})"
        )
    name = (
        f"{rule.metric} {rule.op} {rule.threshold:g} ({rule.bound}) on every {rule.per} "
        f"with >= {rule.min_cases} images"
    )
    candidates = []
    for value, entry in slices[rule.per].items():
        if entry["n"] < rule.min_cases or rule.metric not in entry["values"]:
            continue
        ci = entry["intervals"].get(rule.metric)
        if rule.bound == "point":
            checked = entry["values"][rule.metric]
        elif ci is None:
            raise GateError(
                f"rule on the {rule.bound} bound of {rule.metric} per {rule.per} needs bootstrap "
                "resamples; set gate.bootstrap_resamples above 0"
            )
        else:
            checked = ci[0] if rule.bound == "lower" else ci[1]
        candidates.append((checked, value, entry["n"], tuple(ci) if ci else None))
    if not candidates:
        return RuleResult(
            name, "slice", rule.metric, rule.op, rule.threshold, rule.bound, float("nan"),
            None, None, True,
            f"no {rule.per} has {rule.min_cases} or more images with {rule.metric} defined: "
            "nothing to bind",
        )  # fmt: skip
    worst = (min if rule.op == ">=" else max)(candidates, key=lambda c: c[0])
    checked, value, n, ci = worst
    passed = bool(checked >= rule.threshold if rule.op == ">=" else checked <= rule.threshold)
    what = "point estimate" if rule.bound == "point" else f"{rule.bound} {confidence:.0%} bound"
    return RuleResult(
        name, "slice", rule.metric, rule.op, rule.threshold, rule.bound, checked, None, ci,
        passed,
        f"worst {rule.per} {value} (n={n}): {what} {checked:.4f} {rule.op} {rule.threshold:g}; "
        f"{len(candidates)} of {len(slices[rule.per])} {rule.per} values checked",
    )  # fmt: skip


def champion_rule(
    rule: ChampionRule,
    metrics: dict[str, Any],
    champion_metrics: dict[str, Any],
    diff_ci: tuple[float, float] | None,
) -> RuleResult:
    """Challenger against champion: within `margin` of it, or better by `min_gain`. With
    `bound: lower` the paired CI of challenger − champion decides: its bound on the worse side
    must stay within the margin (a non-inferiority test), not only the point values."""
    value = metric_value(metrics, rule.metric)
    base = metric_value(champion_metrics, rule.metric)
    higher = rule.higher_is_better and rule.metric not in LOWER_IS_BETTER
    sign = 1.0 if higher else -1.0
    if rule.min_gain is not None:
        threshold = base + sign * rule.min_gain
        kind = f"better than champion by {rule.min_gain:g}"
    else:
        threshold = base - sign * rule.margin
        kind = f"non-inferior to champion (margin {rule.margin:g})"
    op = ">=" if higher else "<="
    if rule.bound == "lower":
        if diff_ci is None:
            raise GateError(
                f"champion rule on the CI bound of {rule.metric} needs bootstrap resamples; "
                "set gate.bootstrap_resamples above 0"
            )
        # the worse end of challenger − champion, moved onto the challenger's scale
        value = base + (diff_ci[0] if higher else diff_ci[1])
        kind += ", CI bound"
    passed = bool(value >= threshold if higher else value <= threshold)
    return RuleResult(
        name=f"{rule.metric}: {kind}",
        kind="champion",
        metric=rule.metric,
        op=op,
        threshold=threshold,
        bound=rule.bound,
        value=value,
        champion_value=base,
        ci=diff_ci,
        passed=passed,
        detail=f"challenger {value:.4f} {op} {threshold:.4f} (champion {base:.4f})",
    )


def aligned_champion(champion: ChampionEvaluation, challenger: Predictions) -> np.ndarray | None:
    """Champion scores in the challenger's row and class order, or None when not comparable."""
    scored = champion.predictions
    if not champion.metrics or sorted(scored.classes) != sorted(challenger.classes):
        return None
    probs = scored.probs[:, [scored.classes.index(c) for c in challenger.classes]]
    if challenger.paths and len(set(scored.paths)) == len(scored.paths):
        position = {p: i for i, p in enumerate(scored.paths)}
        if not all(p in position for p in challenger.paths):
            return None
        return probs[[position[p] for p in challenger.paths]]
    return probs if len(probs) == len(challenger.y_true) else None


def _not_comparable(champion: ChampionEvaluation, classes: list[str]) -> RuleResult:
    detail = (
        f"The champion (classes {champion.predictions.classes}) was not scored on the same images "
        f"and classes as the challenger ({classes}): not comparable; approve with --override to "
        "replace it anyway."
    )
    return RuleResult(
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
        detail,
    )


def _renamed(result: RuleResult, set_name: str) -> RuleResult:
    result.name = f"external {set_name}: {result.name}"
    result.kind = "external"
    return result


def external_set_rules(
    external: ExternalSetConfig,
    scores: ExternalScores,
    champion: ChampionEvaluation | None,
    internal: dict[str, Any],
    gate: GateConfig,
) -> tuple[list[RuleResult], dict[str, Any]]:
    """One external set: its floors and champion rules (kind `external`), and its figures beside
    the internal test split's, with a warning when `gate.external_drop_metric` drops by more than
    `gate.external_max_drop` from internal to external (point values, measured on both)."""
    metrics, predictions = scores.metrics, scores.predictions
    classes = list(metrics["classes"])
    drop_metric = gate.external_drop_metric
    for rule in [*external.rules, *external.champion_rules]:
        check_metric(rule.metric, classes)
    check_metric(drop_metric, classes)
    names = sorted(
        {r.metric for r in [*external.rules, *external.champion_rules]}
        | {"accuracy", "macro_f1", "ece", drop_metric}
    )
    y_true, probs = predictions.y_true, predictions.probs
    indices = bootstrap_indices(len(y_true), gate.bootstrap_resamples, gate.seed)
    samples: dict[str, np.ndarray] = {}
    if gate.bootstrap_resamples > 0 and len(y_true) > 0:
        samples = bootstrap_metrics(y_true, probs, classes, names, indices)
    cis = {name: confidence_interval(values, gate.confidence) for name, values in samples.items()}
    results = [
        _renamed(absolute_rule(rule, metrics, cis, gate.confidence), external.name)
        for rule in external.rules
    ]
    theirs = champion.external.get(external.name) if champion is not None else None
    champion_values = None
    if theirs is not None and (their_probs := aligned_champion(theirs, predictions)) is not None:
        champion_values = {name: metric_value(theirs.metrics, name) for name in names}
        diffs: dict[str, tuple[float, float]] = {}
        if samples:
            their_samples = bootstrap_metrics(y_true, their_probs, classes, names, indices)
            diffs = {
                name: confidence_interval(samples[name] - their_samples[name], gate.confidence)
                for name in names
            }
        results += [
            _renamed(
                champion_rule(rule, metrics, theirs.metrics, diffs.get(rule.metric)),
                external.name,
            )
            for rule in external.champion_rules
        ]
    elif theirs is not None and external.champion_rules:
        results.append(_renamed(_not_comparable(theirs, classes), external.name))
    inside, outside = metric_value(internal, drop_metric), metric_value(metrics, drop_metric)
    drop = outside - inside if drop_metric in LOWER_IS_BETTER else inside - outside
    warning = None
    if np.isfinite(drop) and drop > gate.external_max_drop:
        warning = (
            f"external set {external.name}: {drop_metric} {outside:.3f} on {len(y_true)} images, "
            f"{drop:.3f} worse than the internal test split's {inside:.3f} (warning above "
            f"{gate.external_max_drop:g})"
        )
    summary = {
        "n": len(y_true),
        "values": {name: metric_value(metrics, name) for name in names},
        "intervals": {name: list(ci) for name, ci in cis.items()},
        "champion": champion_values,
        "internal": {name: metric_value(internal, name) for name in names},
        "drop_metric": drop_metric,
        "drop": drop,
        "warning": warning,
    }
    return results, summary


def evaluate_gate(
    metrics: dict[str, Any],
    predictions: Predictions,
    gate: GateConfig,
    champion: ChampionEvaluation | None,
    notes: list[str] | None = None,
    external: dict[str, ExternalScores] | None = None,
) -> GateDecision:
    """Apply the absolute and champion/challenger rules; the decision passes only if all pass.

    `notes` (e.g. why there is no champion) are added to the decision's own. `external` holds the
    challenger's scores of each of `gate.external_sets` (`external_set_rules`).
    """
    classes = list(metrics["classes"])
    for rule in [*gate.rules, *gate.champion_rules]:
        check_metric(rule.metric, classes)
    y_true, probs = predictions.y_true, predictions.probs
    if predictions.classes != classes:
        raise GateError(
            f"the predictions' classes {predictions.classes} differ from the metrics' {classes}; "
            "re-run the evaluate step"
        )
    # ECE is always reported (calibration), gated or not.
    gated = sorted({r.metric for r in [*gate.rules, *gate.champion_rules]} | {"ece"})
    notes = list(notes or [])
    indices = bootstrap_indices(len(y_true), gate.bootstrap_resamples, gate.seed)
    samples: dict[str, np.ndarray] = {}
    if gate.bootstrap_resamples > 0 and len(y_true) > 0:
        samples = bootstrap_metrics(y_true, probs, classes, gated, indices)
    cis = {name: confidence_interval(values, gate.confidence) for name, values in samples.items()}
    slices = slice_summary(predictions, gated, gate) if predictions.slices else {}
    results = [
        slice_rule(rule, slices, gate.confidence)
        if rule.per
        else absolute_rule(rule, metrics, cis, gate.confidence)
        for rule in gate.rules
    ]
    champion_values = None
    if champion is None:
        notes.append("No champion in the registry yet: absolute rules only.")
    elif (champion_probs := aligned_champion(champion, predictions)) is None:
        results.append(_not_comparable(champion, classes))
        notes.append(results[-1].detail)
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
            champion_rule(rule, metrics, champion.metrics, diffs.get(rule.metric))
            for rule in gate.champion_rules
        ]
    external_summaries: dict[str, Any] = {}
    for external_set in gate.external_sets:
        scores = (external or {}).get(external_set.name)
        if scores is None:
            raise GateError(
                f"external set {external_set.name!r} was not scored; re-run the evaluate step "
                "with the prepared external sets"
            )
        set_results, external_summaries[external_set.name] = external_set_rules(
            external_set, scores, champion, metrics, gate
        )
        results += set_results
    warnings = [s["warning"] for s in external_summaries.values() if s["warning"]]
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
        challenger_saved_model_sha256=metrics.get("saved_model_sha256"),
        slices=slices,
        external_sets=external_summaries,
        warnings=warnings,
    )
