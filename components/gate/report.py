"""The gate's Markdown report for the pipeline UI: every rule, both models' values, the CIs."""

from __future__ import annotations

import numpy as np

from tumorflow.components.evaluation.metrics import ECE_BINS
from tumorflow.components.gate.rules import GateDecision


def _fmt(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.4f}"


def _slice_sections(decision: GateDecision) -> list[str]:
    """One table per slice column (site, scanner, ...): images and each gated metric with its CI."""
    lines: list[str] = []
    confidence = decision.bootstrap["confidence"]
    for column, entries in decision.slices.items():
        names = sorted({name for entry in entries.values() for name in entry["values"]})
        lines += [
            "",
            f"## Per {column} ({confidence:.0%} bootstrap CIs)",
            "",
            f"| {column} | images | " + " | ".join(names) + " |",
            "|---|---:|" + "---|" * len(names),
        ]
        for value, entry in entries.items():
            cells = []
            for name in names:
                point = entry["values"].get(name)
                ci = entry["intervals"].get(name)
                interval = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
                cells.append(_fmt(point) + interval)
            lines.append(f"| {value} | {entry['n']} | " + " | ".join(cells) + " |")
    return lines


def _external_sections(decision: GateDecision) -> list[str]:
    """Each external set beside the internal test split: images, values with CIs, the
    champion's, and the measured drop (a warning above the configured one)."""
    if not decision.external_sets:
        return []
    lines = [
        "",
        "## External sets (never trained on), beside the internal test split",
        "",
        "| set | images | metric | internal test | external (CI) | champion | drop |",
        "|---|---:|---|---|---|---|---|",
    ]
    for name, entry in decision.external_sets.items():
        for metric, value in entry["values"].items():
            ci = entry["intervals"].get(metric)
            interval = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
            theirs = (entry["champion"] or {}).get(metric)
            drop = _fmt(entry["drop"]) if metric == entry["drop_metric"] else ""
            lines.append(
                f"| {name} | {entry['n']} | {metric} | {_fmt(entry['internal'].get(metric))} | "
                f"{_fmt(value)}{interval} | {_fmt(theirs)} | {drop} |"
            )
    return lines


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
    lines += [f"> **Warning:** {warning}" for warning in decision.warnings]
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
    lines += _slice_sections(decision)
    lines += _external_sections(decision)
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
