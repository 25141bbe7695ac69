"""The test images a reviewer looks at before approving: those whose prediction changed between
champion and challenger and those the challenger gets wrong, each with the challenger's Grad-CAM
overlay from its own `explain` signature.

The gate step writes them beside decision.json (`review_images.json`, `overlays/*.png`, and the
champion's `champion_predictions.csv`), so the review console only reads files. Evaluate has
already explained the challenger's most confident mistakes (`review_heatmaps.npz`); the gate
explains only the other images it shows, those whose answer changed from the champion's, so with
no champion it loads no model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tumorflow.components.evaluation.evaluate import MAX_REVIEW_IMAGES
from tumorflow.components.evaluation.metrics import Predictions
from tumorflow.core.artifacts import CHAMPION_PREDICTIONS_FILE, REVIEW_FILE

log = logging.getLogger(__name__)

OVERLAY_DIR = "overlays"
CHANGED = "changed"
WRONG = "wrong"


def select_review_images(
    challenger: Predictions, champion: Predictions | None, limit: int = MAX_REVIEW_IMAGES
) -> list[dict[str, Any]]:
    """The images whose top class differs between champion and challenger (those the challenger
    now gets wrong first), then the others the challenger gets wrong, most confident first within
    each, `limit` in all. Each entry names
    the image, its label, both models' answers and why it is shown (`reasons`)."""
    classes = challenger.classes
    guesses = challenger.probs.argmax(axis=1)
    champion_rows: dict[str, np.ndarray] = {}
    if champion is not None and list(champion.classes) == list(classes):
        champion_rows = dict(zip(champion.paths, champion.probs, strict=True))
    entries = []
    for path, label, probs, guess in zip(
        challenger.paths, challenger.y_true, challenger.probs, guesses, strict=True
    ):
        entry: dict[str, Any] = {
            "path": path,
            "label": classes[int(label)],
            "challenger": classes[int(guess)],
            "challenger_confidence": float(probs[guess]),
        }
        reasons = []
        if path in champion_rows:
            theirs = int(champion_rows[path].argmax())
            entry |= {
                "champion": classes[theirs],
                "champion_confidence": float(champion_rows[path][theirs]),
            }
            if theirs != guess:
                reasons.append(CHANGED)
        if guess != label:
            reasons.append(WRONG)
        if reasons:
            entries.append(entry | {"reasons": reasons})
    entries.sort(
        key=lambda e: (
            CHANGED not in e["reasons"],
            WRONG not in e["reasons"],
            -e["challenger_confidence"],
        )
    )
    return entries[:limit]


def write_review_images(
    saved_model_dir: Path | None,
    split_dir: Path,
    challenger: Predictions,
    champion: Predictions | None,
    output_dir: Path,
    limit: int = MAX_REVIEW_IMAGES,
    heatmaps: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Select the review images, write the challenger's overlay of each under `overlays/`
    (`overlay`: the path relative to `output_dir`) and `review_images.json`; also the
    champion's predictions on the same images. `heatmaps` (image path -> heat map) are those
    evaluate made; the SavedModel explains the rest. Without a SavedModel no overlays are made."""
    from tumorflow.components.data.tfrecords import read_records
    from tumorflow.components.evaluation.evaluate import explain_images
    from tumorflow.components.evaluation.overlays import overlay_heatmap

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if champion is not None:
        champion.write(output_dir / CHAMPION_PREDICTIONS_FILE)
    entries = select_review_images(challenger, champion, limit)
    if saved_model_dir is not None and entries:
        wanted = {e["path"]: e for e in entries}
        encoded = {
            r.path: r.encoded for r in read_records(Path(split_dir), "test") if r.path in wanted
        }
        shown = [e for e in entries if e["path"] in encoded]
        made = dict(heatmaps or {})
        missing = [e["path"] for e in shown if e["path"] not in made]
        if missing:
            explained = explain_images(saved_model_dir, [encoded[p] for p in missing])
            made |= dict(zip(missing, explained, strict=True))
        (output_dir / OVERLAY_DIR).mkdir(exist_ok=True)
        for index, entry in enumerate(shown):
            name = f"{OVERLAY_DIR}/{index:03d}.png"
            heatmap = made[entry["path"]]
            (output_dir / name).write_bytes(overlay_heatmap(encoded[entry["path"]], heatmap))
            entry["overlay"] = name
        log.info(
            "review overlays: %d explained by evaluate, %d here",
            len(shown) - len(missing),
            len(missing),
        )
    (output_dir / REVIEW_FILE).write_text(json.dumps(entries, indent=2))
    counts = {r: sum(r in e["reasons"] for e in entries) for r in (CHANGED, WRONG)}
    log.info(
        "review images shown: %d changed between champion and challenger, %d wrong (cap %d)",
        counts[CHANGED],
        counts[WRONG],
        limit,
    )
    return entries
