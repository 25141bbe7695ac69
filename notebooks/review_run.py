# %% [markdown]
# # Review a retraining run
#
# What a reviewer at the model gate looks at before `tumorflow approve RUN`: the split and its
# leakage guard, the training curves, the test metrics, every gate rule against the champion, and
# the drift of the new data. Percent-format notebook (Jupytext / VS Code); run it from the
# repository root, or as a script: `python notebooks/review_run.py`.

# %% tags=["parameters"]
RUN_ROOT = "runs"
RUN_NAME = ""  # a folder under <RUN_ROOT>/pipeline_root; empty: the newest run

# %%
import json
from pathlib import Path

import pandas as pd

from tumorflow.pipelines.runner import artifact_path

pipeline_root = Path(RUN_ROOT) / "pipeline_root"
runs = sorted(p for p in pipeline_root.iterdir() if p.is_dir() and not p.name.startswith("."))
run_dir = pipeline_root / RUN_NAME if RUN_NAME else runs[-1]
print(f"run {run_dir.name} ({len(runs)} runs under {pipeline_root})")

# %% [markdown]
# ## The split: class counts, duplicate groups, quarantined files

# %%
split_dir = artifact_path(run_dir, "validate-and-split", "split")
manifest = json.loads((split_dir / "split_manifest.json").read_text())
counts = pd.DataFrame({name: s["class_counts"] for name, s in manifest["splits"].items()})
print(counts)
print("grouping:", manifest["grouping"])
quarantine = pd.read_csv(split_dir / "quarantine.csv")
print(f"{len(quarantine)} quarantined files")
print(quarantine.head(10))
rows = pd.read_csv(split_dir / "split_manifest.csv")
straddling = rows.groupby("group_id")["split"].nunique().gt(1).sum()
assert straddling == 0, f"{straddling} duplicate groups straddle splits"

# %% [markdown]
# ## Training: both stages

# %%
model_dir = artifact_path(run_dir, "train", "model")
history = pd.read_csv(model_dir / "history.csv")
print(history.groupby("stage")[["loss", "val_loss", "val_accuracy"]].agg(["first", "last"]))
print("curves:", model_dir / "training_curves.png")

# %% [markdown]
# ## Test metrics

# %%
evaluation_dir = artifact_path(run_dir, "evaluate", "evaluation")
metrics = json.loads((evaluation_dir / "metrics.json").read_text())
per_class = pd.DataFrame(metrics["per_class"]).T
print(per_class.round(3))
print({k: metrics[k] for k in ("accuracy", "macro_f1", "macro_roc_auc", "ece")})

# %% [markdown]
# ## The gate: each rule, challenger vs champion

# %%
decision = json.loads((run_dir / "gate" / "decision" / "decision.json").read_text())
rules = pd.DataFrame(decision["rules"])[["name", "value", "champion_value", "passed"]]
print(rules)
print("gate passed:", decision["passed"], "| champion version:", decision.get("champion_version"))

# %% [markdown]
# ## Drift of the new data against the served model's reference

# %%
verdict_path = run_dir / "drift-report" / "verdict" / "verdict.json"
verdict = json.loads(verdict_path.read_text())
print(
    {k: verdict.get(k) for k in ("drift_detected", "share_of_drifted_columns", "drifted_columns")}
)
print(verdict.get("message") or "")
