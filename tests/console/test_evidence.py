"""What the console reads from a run folder when the kfp.local cache skipped steps of the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tumorflow.console.evidence import run_evidence, run_folder
from tumorflow.core import artifacts


def _cached_run(run_root: Path) -> str:
    """A first run that evaluated, and a second whose download and evaluate came from the cache."""
    root = run_root / "pipeline_root"
    first, second = (
        root / "tumorflow-retrain-20261201120000",
        root / "tumorflow-retrain-20261202120000",
    )
    evaluation = first / "evaluate" / "evaluation"
    evaluation.mkdir(parents=True)
    (evaluation / artifacts.METRICS_FILE).write_text(json.dumps({"classes": ["normal", "tumor"]}))
    with (evaluation / artifacts.PREDICTIONS_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label_index", "p_normal", "p_tumor"])
        writer.writerow(["a.png", 1, 0.8, 0.2])
        writer.writerow(["b.png", 0, 0.9, 0.1])
    (first / "download" / "raw").mkdir(parents=True)
    (first / "download" / "raw" / artifacts.SOURCE_JSON).write_text(
        json.dumps({"dataset_version": "sha256:abc"})
    )
    (second / "dataset-version").mkdir(parents=True)
    (second / "dataset-version" / "executor_output.json").write_text(
        json.dumps({"parameterValues": {"fingerprint": "sha256:abc"}})
    )
    (second / "gate" / "decision").mkdir(parents=True)
    (second / "gate" / "decision" / artifacts.DECISION_FILE).write_text('{"passed": true}')
    return second.name


def test_the_review_page_of_a_run_with_a_cached_evaluation_shows_its_metrics(tmp_path):
    evidence = run_evidence(tmp_path, _cached_run(tmp_path))

    assert evidence.decision == {"passed": True}
    assert evidence.metrics == {"classes": ["normal", "tumor"]}
    assert [w["path"] for w in evidence.wrong_predictions] == ["a.png"]
    # the plots of the cached step stay in the earlier run's folder, which the console does not link
    assert evidence.plots == {}


def test_the_run_list_shows_the_dataset_version_of_a_cached_download(tmp_path):
    from tumorflow.console.evidence import _dataset_version

    assert _dataset_version(tmp_path, _cached_run(tmp_path)) == "sha256:abc"


def test_a_run_name_with_a_path_in_it_names_no_folder(tmp_path):
    name = _cached_run(tmp_path)

    assert run_folder(tmp_path, name) == tmp_path / "pipeline_root" / name
    assert run_folder(tmp_path, f"../{name}") is None


def render_review(run_root: Path, pipeline_run: str) -> str:
    """The review page of a run as the console renders it (its template, without a server)."""
    from jinja2 import Environment, FileSystemLoader

    from tumorflow.console.app import TEMPLATES
    from tumorflow.console.evidence import CandidateRow

    run = CandidateRow(pipeline_run, "kidney", "1", 0, "waiting", True)
    template = Environment(loader=FileSystemLoader(TEMPLATES)).get_template("review.html")
    return template.render(run=run, evidence=run_evidence(run_root, pipeline_run), may_decide=False)


def _run_with_split(run_root: Path, **manifest_fields) -> str:
    """A run folder holding only validate's split manifest."""
    run = run_root / "pipeline_root" / "tumorflow-retrain-20261203120000"
    split = run / "validate-and-split" / "split"
    split.mkdir(parents=True)
    (split / artifacts.SPLIT_MANIFEST_JSON).write_text(json.dumps(manifest_fields))
    return run.name


def test_the_review_page_shows_what_a_random_split_would_leak(tmp_path):
    leak_report = {
        "random_split": {"test_share": 0.8125, "min": 0.75, "max": 0.875, "seeds": 10},
        "source_split": {"test_share": 0.25, "test_images": 40, "leaked_images": 10},
    }
    name = _run_with_split(tmp_path, leak_report=leak_report)

    assert run_evidence(tmp_path, name).leak_report == leak_report
    page = render_review(tmp_path, name)
    assert "<b>81.2 %</b>" in page and "from 75.0 to 87.5 % over 10 shuffles" in page
    assert "10 of 40 test images" in page and "<b>25.0 %</b>" in page


def test_a_run_without_a_leak_report_shows_none(tmp_path):
    page = render_review(tmp_path, _run_with_split(tmp_path, classes=["a", "b"]))
    assert "leak-report" not in page


def test_the_review_page_shows_each_external_set_beside_the_internal_split(tmp_path):
    name = _run_with_split(tmp_path, classes=["normal", "tumor"])
    decision_dir = tmp_path / "pipeline_root" / name / "gate" / "decision"
    decision_dir.mkdir(parents=True)
    warning = "external set site-b: macro_f1 0.610 on 40 images, 0.350 worse than ..."
    decision = {
        "passed": True,
        "rules": [],
        "warnings": [warning],
        "external_sets": {
            "site-b": {
                "n": 40,
                "values": {"accuracy": 0.625, "macro_f1": 0.61},
                "intervals": {"accuracy": [0.5, 0.75], "macro_f1": [0.45, 0.74]},
                "champion": {"accuracy": 0.7, "macro_f1": 0.69},
                "internal": {"accuracy": 0.95, "macro_f1": 0.96},
                "drop_metric": "macro_f1",
                "drop": 0.35,
                "warning": warning,
            }
        },
    }
    (decision_dir / artifacts.DECISION_FILE).write_text(json.dumps(decision))

    page = render_review(tmp_path, name)

    assert f"<b>Warning:</b> {warning}" in page
    row = page[page.index('<tr class="warning"><td>site-b</td>') :].split("</tr>")[0]
    assert "<td>macro_f1</td>" in row and "<td>0.960</td>" in row and "<td>0.610</td>" in row
    assert "[0.450, 0.740]" in row and "<td>0.690</td>" in row and "<td>0.350</td>" in row
