"""The names of the files the pipeline's steps write into their output folders: one spelling each.

The step that writes a file imports its name from here, and so does every reader (the next step,
deploy, the run-folder reader of `pipelines/run_folder.py`, the console, the CLI). What each file
holds is described in docs/artifacts.md.
"""

from __future__ import annotations

# download: the raw images, their manifest and where they came from.
RAW_FILES = "files"
MANIFEST_CSV = "manifest.csv"
SOURCE_JSON = "source.json"

# validate & split: the split's manifest beside its TFRecord shards.
SPLIT_MANIFEST_JSON = "split_manifest.json"
SPLIT_MANIFEST_CSV = "split_manifest.csv"

# train: the model folder.
MODEL_FILE = "model.keras"
MODEL_INFO_FILE = "model_info.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"
# The serving export inside a model folder: what evaluate scores and deploy publishes.
SERVING_EXPORT = "saved_model"
# What the export folds into the SavedModel besides the weights: the calibration temperature and
# the OOD detector's statistics, fitted after training (components/training/serving_statistics.py).
SERVING_STATISTICS_FILE = "serving_statistics.npz"

# evaluate.
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
# Which SavedModel was scored: the gate explains the challenger's review images with it.
EVALUATED_MODEL_FILE = "evaluated_model.json"
# Grad-CAM heat maps of the test images the model gets wrong, most confident first: the review's
# overlays when there is no champion, so the gate loads no model for them.
REVIEW_HEATMAPS_FILE = "review_heatmaps.npz"
PLOTS = ("confusion_matrix.png", "roc.png", "reliability.png")

# external-site sets (components/data/external_sets.py): the prepared sets' index beside one split
# dataset per set; evaluate writes each set's metrics and predictions under EXTERNAL_DIR/<name>/.
EXTERNAL_SETS_FILE = "external_sets.json"
EXTERNAL_DIR = "external"

# gate.
DECISION_FILE = "decision.json"
GATE_REPORT_FILE = "report.md"
REVIEW_FILE = "review_images.json"
CHAMPION_PREDICTIONS_FILE = "champion_predictions.csv"

# approval.
APPROVAL_FILE = "approval.json"

# drift report and drift check.
VERDICT_FILE = "verdict.json"
DRIFT_REPORT_HTML = "report.html"
DRIFT_REPORT_JSON = "report.json"
TRIGGER_FILE = "trigger.json"
