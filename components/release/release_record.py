"""The release record of one model version: what was trained on what, how it scored, who signed
off, and what happened to it since. `tumorflow release show|diff` and the console print it.

Built from files and records that already exist, never from memory: the run's split manifest,
model info, metrics and gate decision (found by the caller, e.g. through the run folder), the
registry's model-version tags (untrusted storage: every signed decision found there is verified
here and shown as verified or not), the served version's `assets.extra/`, and the audit log.
`diff` of two records is the change record a Predetermined Change Control Plan asks for.
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorflow.components.release.registry import TAG_CODE_VERSION
from tumorflow.components.release.signing import SignatureInvalid, SignedRecord, canonical
from tumorflow.core import serving_layout

if TYPE_CHECKING:
    from tumorflow.components.release.trust_root import TrustRoot

SCHEMA = "tumorflow.release-record/v1"
# The training settings of model_info.json that make up a version's configuration.
_CONFIG_KEYS = (
    "backbone",
    "weights",
    "image_size",
    "grayscale",
    "stage1",
    "stage2",
    "dtype_policy",
)
_HISTORY_EVENTS = ("deploy", "rollback", "promote", "canary")
_DRIFT_EVENTS = ("drift", "trigger", "retrain")


@dataclass(frozen=True)
class RunFiles:
    """The files of the pipeline run that made a version (None: not on this machine)."""

    dataset_version: str | None = None
    split_manifest: Path | None = None
    model_info: Path | None = None
    metrics: Path | None = None
    decision: Path | None = None
    trigger: Path | None = None
    drift_verdict: Path | None = None


def _json(path: Path | None) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())


def file_sha256(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _data(files: RunFiles) -> dict[str, Any]:
    manifest = _json(files.split_manifest)
    return {
        "dataset_version": files.dataset_version
        or (manifest.get("source") or {}).get("dataset_version"),
        "split_manifest_sha256": file_sha256(files.split_manifest),
        "classes": manifest.get("classes"),
        "split_counts": {
            name: split.get("count") for name, split in (manifest.get("splits") or {}).items()
        },
        "strategy": manifest.get("strategy"),
        "seed": manifest.get("seed"),
    }


def _config(info: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    settings = {k: info[k] for k in _CONFIG_KEYS if k in info}
    return {
        "settings": settings,
        "digest": hashlib.sha256(canonical(settings)).hexdigest() if settings else None,
        # What the pipeline records of the code and image it ran (not recorded: None).
        "code_version": tags.get(TAG_CODE_VERSION),
        "image_digest": tags.get("tumorflow.image_digest"),
    }


def _training(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "epochs_run": info.get("epochs_run"),
        "saved_model_sha256": info.get("saved_model_sha256"),
        "weights_sha256": info.get("weights_sha256"),
        "mlflow_run_id": info.get("mlflow_run_id"),
    }


def _metrics(decision: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Point values with their bootstrap CIs (from the gate's decision), else evaluate's points."""
    intervals = (decision.get("bootstrap") or {}).get("intervals") or {}
    points = decision.get("challenger") or {
        k: metrics[k] for k in ("accuracy", "macro_f1", "macro_roc_auc", "ece") if k in metrics
    }
    return {
        name: {"value": value, "ci": intervals.get(name)}
        for name, value in sorted(points.items())
        if isinstance(value, int | float) or value is None
    }


def _gate(decision: dict[str, Any], decision_path: Path | None) -> dict[str, Any]:
    return {
        "passed": decision.get("passed"),
        "decision_digest": file_sha256(decision_path),
        "champion_version": decision.get("champion_version"),
        "confidence": (decision.get("bootstrap") or {}).get("confidence"),
        "rules": [
            {
                k: rule.get(k)
                for k in ("name", "metric", "op", "threshold", "value", "ci", "passed", "detail")
            }
            for rule in decision.get("rules") or []
        ],
        "external_sets": _external_sets(decision),
        "warnings": list(decision.get("warnings") or []),
    }


def _external_sets(decision: dict[str, Any]) -> dict[str, Any]:
    """Each external set's figures beside the internal test split's (the gate's decision)."""
    return {
        name: {
            "n": entry.get("n"),
            "metrics": {
                metric: {
                    "value": value,
                    "ci": (entry.get("intervals") or {}).get(metric),
                    "internal": (entry.get("internal") or {}).get(metric),
                    "champion": (entry.get("champion") or {}).get(metric),
                }
                for metric, value in sorted((entry.get("values") or {}).items())
            },
            "drop_metric": entry.get("drop_metric"),
            "drop": entry.get("drop"),
            "warning": entry.get("warning"),
        }
        for name, entry in (decision.get("external_sets") or {}).items()
    }


def _check(
    signed: SignedRecord,
    trust: TrustRoot | None,
    model_name: str,
    serving_digest: str | None,
) -> tuple[bool, str]:
    """(verified, how): the signature, and with a trust root the signer's right and the artifact."""
    try:
        key = signed.public_key()
    except SignatureInvalid as exc:
        return False, f"signature does not verify: {exc}"
    if trust is None:
        return True, f"signature verifies (key {key.split()[-1][:16]}…; no trust root checked)"
    from tumorflow.components.release.trust_root import DecisionRefused

    record = signed.record
    about_artifact = record.get("action") in ("approve", "reject", "override", "auto_approve")
    try:
        verified = trust.verify(
            signed,
            action=str(record.get("action")),
            model_name=model_name,
            serving_digest=serving_digest if about_artifact else None,
            at=record.get("signed_at"),
        )
    except DecisionRefused as exc:
        return False, f"refused by the trust root: {exc}"
    return True, f"verified against the trust root {trust.source or ''}".rstrip() + (
        f" ({verified.identity})" if getattr(verified, "identity", None) else ""
    )


def _decisions(
    found: list[tuple[str, SignedRecord]],
    trust: TrustRoot | None,
    model_name: str,
    serving_digest: str | None,
) -> list[dict[str, Any]]:
    """Every signed decision once (the same record may sit in a tag, release.json and the log)."""
    seen: dict[str, dict[str, Any]] = {}
    for where, signed in found:
        digest = signed.digest()
        if digest in seen:
            seen[digest]["found_in"].append(where)
            continue
        ok, how = _check(signed, trust, model_name, serving_digest)
        record = signed.record
        seen[digest] = {
            **{
                k: record.get(k)
                for k in (
                    "action",
                    "meaning",
                    "signer",
                    "authenticated_via",
                    "signed_at",
                    "reason",
                    "model_version",
                    "serving_digest",
                    "from_version",
                    "to_version",
                )
            },
            "verified": ok,
            "verification": how,
            "digest": digest,
            "found_in": [where],
        }
    return sorted(seen.values(), key=lambda d: str(d.get("signed_at") or ""))


def _served(served_folder: str | Path | None) -> tuple[dict[str, Any], list[SignedRecord]]:
    if served_folder is None:
        return {}, []
    folder = Path(served_folder)
    info = _json(folder / serving_layout.ASSETS_EXTRA / serving_layout.MODEL_INFO)
    release = _json(folder / serving_layout.ASSETS_EXTRA / serving_layout.RELEASE_RECORD)
    records = [
        SignedRecord(item["record"], item["signature"]) for item in release.get("records") or []
    ]
    return {
        "folder": str(folder),
        "serving_digest": info.get("serving_digest") or release.get("serving_digest"),
        "deployed_at": info.get("deployed_at"),
        "release_record": bool(release),
    }, records


def build(
    model_name: str,
    model_version: str,
    *,
    tags: dict[str, str],
    files: RunFiles,
    served_folder: str | Path | None = None,
    audit_entries: list[dict[str, Any]] | None = None,
    trust: TrustRoot | None = None,
) -> dict[str, Any]:
    """The release record of `model_name` version `model_version` (a JSON-ready dict)."""
    from tumorflow.components.release.registry import (
        TAG_PIPELINE_RUN,
        TAG_SERVING_DIGEST,
        TAG_SERVING_VERSION,
        TAG_TRIGGER_REASON,
        decision_tags,
    )

    info = _json(files.model_info)
    decision = _json(files.decision)
    served, release_records = _served(served_folder)
    serving_digest = (
        served.get("serving_digest")
        or tags.get(TAG_SERVING_DIGEST)
        or info.get("saved_model_sha256")
    )
    found: list[tuple[str, SignedRecord]] = []
    for tag, value in decision_tags(tags):
        try:
            found.append((f"registry tag {tag}", SignedRecord.from_json(value)))
        except SignatureInvalid:
            continue
    found += [("release.json", signed) for signed in release_records]
    serving_version = tags.get(TAG_SERVING_VERSION)
    history, drift = [], []
    for entry in audit_entries or []:
        event = entry.get("event") or {}
        if event.get("model_name") not in (None, model_name):
            continue
        mine = str(event.get("model_version")) == str(model_version) or (
            serving_version is not None
            and str(serving_version)
            in {str(event.get(k)) for k in ("stable", "replaced", "version")}
        )
        if "decision" in entry:
            signed = SignedRecord(entry["decision"]["record"], entry["decision"]["signature"])
            if str(signed.record.get("model_version")) == str(model_version) or mine:
                found.append((f"audit log entry {entry.get('seq')}", signed))
        what = str(event.get("what", ""))
        row = {"seq": entry.get("seq"), "at": entry.get("at"), **event}
        if mine and what.startswith(_HISTORY_EVENTS):
            history.append(row)
        elif what.startswith(_DRIFT_EVENTS):
            drift.append(row)
    trigger = _json(files.trigger)
    return {
        "schema": SCHEMA,
        "model_name": model_name,
        "model_version": str(model_version),
        "pipeline_run": tags.get(TAG_PIPELINE_RUN),
        "trigger_reason": tags.get(TAG_TRIGGER_REASON) or trigger.get("reason"),
        "data": _data(files),
        "config": _config(info, tags),
        "training": _training(info),
        "metrics": _metrics(decision, _json(files.metrics)),
        "gate": _gate(decision, files.decision),
        "serving": {"serving_version": serving_version, "serving_digest": serving_digest, **served},
        "decisions": _decisions(found, trust, model_name, serving_digest),
        "history": history,
        "drift": {
            "events": drift,
            "trigger": trigger or None,
            "verdict": _json(files.drift_verdict),
        },
    }


def _approvers(record: dict[str, Any]) -> list[str]:
    return sorted(
        {
            f"{d['signer']} ({d['action']}{'' if d['verified'] else ', NOT verified'})"
            for d in record["decisions"]
            if d.get("action") in ("approve", "override", "auto_approve")
        }
    )


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What changed from `old` to `new`: data, config, metrics (with CIs), gate, who approved."""

    def changed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {
            k: {"from": a.get(k), "to": b.get(k)}
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        }

    metrics = {
        name: {
            "from": old["metrics"].get(name, {}).get("value"),
            "to": new["metrics"].get(name, {}).get("value"),
            "from_ci": old["metrics"].get(name, {}).get("ci"),
            "to_ci": new["metrics"].get(name, {}).get("ci"),
        }
        for name in sorted(set(old["metrics"]) | set(new["metrics"]))
        if old["metrics"].get(name) != new["metrics"].get(name)
    }
    rules_old = {r["name"]: r for r in old["gate"]["rules"]}
    rules_new = {r["name"]: r for r in new["gate"]["rules"]}
    return {
        "schema": SCHEMA.replace("record", "diff"),
        "model_name": new["model_name"],
        "from_version": old["model_version"],
        "to_version": new["model_version"],
        "data": changed(old["data"], new["data"]),
        "config": changed(old["config"]["settings"], new["config"]["settings"])
        | changed(
            {k: old["config"][k] for k in ("code_version", "image_digest")},
            {k: new["config"][k] for k in ("code_version", "image_digest")},
        ),
        "metrics": metrics,
        "gate_rules": {
            "added": sorted(set(rules_new) - set(rules_old)),
            "removed": sorted(set(rules_old) - set(rules_new)),
            "changed": sorted(
                n
                for n in set(rules_old) & set(rules_new)
                if (rules_old[n]["op"], rules_old[n]["threshold"])
                != (rules_new[n]["op"], rules_new[n]["threshold"])
            ),
        },
        "approved_by": {"from": _approvers(old), "to": _approvers(new)},
    }


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list | tuple) and len(ci) == 2 else "-"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_text(record: dict[str, Any]) -> str:
    """The record as the terminal shows it."""
    data, gate, serving = record["data"], record["gate"], record["serving"]
    lines = [
        f"release record of {record['model_name']} version {record['model_version']}",
        f"pipeline run     {record['pipeline_run'] or '-'}",
        f"trigger          {record['trigger_reason'] or 'by hand'}",
        "",
        "data",
        f"  dataset version       {data['dataset_version'] or '-'}",
        f"  split manifest sha256 {data['split_manifest_sha256'] or '-'}",
        f"  split counts          {data['split_counts'] or '-'} ({data['strategy'] or '-'})",
        "config",
        f"  digest       {record['config']['digest'] or '-'}",
        f"  settings     {json.dumps(record['config']['settings'], sort_keys=True)}",
        f"  code         {record['config']['code_version'] or 'not recorded'}",
        f"  image        {record['config']['image_digest'] or 'not recorded'}",
        "training",
        f"  epochs       {record['training']['epochs_run'] or '-'}",
        f"  SavedModel   {record['training']['saved_model_sha256'] or '-'}",
        f"metrics (CI at {gate['confidence'] or '-'})",
        *(
            f"  {name:<24} {_num(m['value']):>8}  {_ci(m['ci'])}"
            for name, m in record["metrics"].items()
        ),
        f"gate             {'PASSED' if gate['passed'] else 'FAILED' if gate['passed'] is False else '-'}"
        f" (decision.json sha256 {gate['decision_digest'] or '-'})",
        *(
            f"  {'PASS' if r['passed'] else 'FAIL'} {r['name']}: {r['metric']} {r['op']} "
            f"{r['threshold']} (measured {_num(r['value'])}, CI {_ci(r['ci'])})"
            for r in gate["rules"]
        ),
        *(f"  WARNING {warning}" for warning in gate.get("warnings", [])),
        "external sets (never trained on; internal test split beside)",
        *(
            f"  {name} (n={entry['n']}) {metric:<14} {_num(m['value']):>8}  {_ci(m['ci'])}  "
            f"internal {_num(m['internal'])}"
            + (f", drop {_num(entry['drop'])}" if metric == entry["drop_metric"] else "")
            for name, entry in gate.get("external_sets", {}).items()
            for metric, m in entry["metrics"].items()
        ),
        *(() if gate.get("external_sets") else ("  none",)),
        "serving",
        f"  version      {serving.get('serving_version') or '-'}",
        f"  digest       {serving.get('serving_digest') or '-'}",
        "signed decisions",
        *(
            f"  {d['signed_at']} {d['action']:<9} {d['signer']} ({d['meaning']}): "
            f"{'VERIFIED' if d['verified'] else 'NOT VERIFIED'}: {d['verification']}"
            + (f"; reason: {d['reason']}" if d.get("reason") else "")
            for d in record["decisions"]
        ),
        *(() if record["decisions"] else ("  none",)),
        "deploy/rollback history",
        *(
            f"  {h.get('at')} {h.get('what')} by {h.get('who', '-')} {h.get('why', '')}".rstrip()
            for h in record["history"]
        ),
        *(() if record["history"] else ("  none",)),
        "drift events",
        *(
            f"  {e.get('at')} {e.get('what')} {e.get('why', '')}".rstrip()
            for e in record["drift"]["events"]
        ),
        *(() if record["drift"]["events"] else ("  none",)),
    ]
    return "\n".join(lines)


def render_diff_text(change: dict[str, Any]) -> str:
    """A diff as the terminal shows it: one line per change."""
    lines = [
        f"{change['model_name']}: what changed from version {change['from_version']} "
        f"to {change['to_version']}"
    ]
    for section in ("data", "config"):
        lines.append(section)
        for key, value in change[section].items():
            lines.append(f"  {key}: {value['from']} -> {value['to']}")
        if not change[section]:
            lines.append("  unchanged")
    lines.append("metrics")
    for name, m in change["metrics"].items():
        lines.append(
            f"  {name}: {_num(m['from'])} {_ci(m['from_ci'])} -> {_num(m['to'])} {_ci(m['to_ci'])}"
        )
    rules = change["gate_rules"]
    lines.append(
        f"gate rules: added {rules['added'] or '-'}, removed {rules['removed'] or '-'}, "
        f"changed {rules['changed'] or '-'}"
    )
    approved = change["approved_by"]
    lines.append(
        f"approved by: {', '.join(approved['from']) or 'nobody'} -> "
        f"{', '.join(approved['to']) or 'nobody'}"
    )
    return "\n".join(lines)


def render_html(title: str, text: str, data: dict[str, Any]) -> str:
    """A self-contained page a reviewer can file: the text view and the JSON it was made from."""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em;"
        "white-space:pre-wrap}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><pre id='record'>{html.escape(text)}</pre>"
        "<details><summary>JSON</summary>"
        f"<pre id='json'>{html.escape(json.dumps(data, indent=2, sort_keys=True))}</pre>"
        "</details></body></html>\n"
    )
