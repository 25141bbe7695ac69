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

import pandas as pd

from tumorflow.core import artifacts
from tumorflow.pipelines import run_folder

pipeline_root = run_folder.pipeline_root(RUN_ROOT)
runs = sorted(p for p in pipeline_root.iterdir() if p.is_dir() and not p.name.startswith("."))
run_dir = pipeline_root / RUN_NAME if RUN_NAME else runs[-1]
print(f"run {run_dir.name} ({len(runs)} runs under {pipeline_root})")
run = run_folder.RunFolder(run_dir)  # reads cached steps from the earlier run that made them

# %% [markdown]
# ## The split: class counts, duplicate groups, quarantined files

# %%
split_dir = run.artifact(*run_folder.SPLIT)
manifest = json.loads((split_dir / artifacts.SPLIT_MANIFEST_JSON).read_text())
counts = pd.DataFrame({name: s["class_counts"] for name, s in manifest["splits"].items()})
print(counts)
print("grouping:", manifest["grouping"])
quarantine = pd.read_csv(split_dir / "quarantine.csv")
print(f"{len(quarantine)} quarantined files")
print(quarantine.head(10))
rows = pd.read_csv(split_dir / artifacts.SPLIT_MANIFEST_CSV)
straddling = rows.groupby("group_id")["split"].nunique().gt(1).sum()
assert straddling == 0, f"{straddling} duplicate groups straddle splits"

# %% [markdown]
# ## Training: both stages

# %%
model_dir = run.artifact(*run_folder.MODEL)
history = pd.read_csv(model_dir / artifacts.HISTORY_FILE)
print(history.groupby("stage")[["loss", "val_loss", "val_accuracy"]].agg(["first", "last"]))
print("curves:", model_dir / artifacts.CURVES_FILE)

# %% [markdown]
# ## Test metrics

# %%
metrics = run.metrics()
per_class = pd.DataFrame(metrics["per_class"]).T
print(per_class.round(3))
print({k: metrics[k] for k in ("accuracy", "macro_f1", "macro_roc_auc", "ece")})

# %% [markdown]
# ## The gate: each rule, challenger vs champion

# %%
decision = run.gate_decision()
rules = pd.DataFrame(decision["rules"])[["name", "value", "champion_value", "passed"]]
print(rules)
print("gate passed:", decision["passed"], "| champion version:", decision.get("champion_version"))

# %% [markdown]
# ## Drift of the new data against the served model's reference

# %%
verdict = run.json(run_folder.DRIFT_REPORT_VERDICT, artifacts.VERDICT_FILE)
print(
    {k: verdict.get(k) for k in ("drift_detected", "share_of_drifted_columns", "drifted_columns")}
)
print(verdict.get("message") or "")
