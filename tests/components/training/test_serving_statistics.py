"""The serving statistics the train step fits, through the exported SavedModel of `tiny_model`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tumorflow.bench.ood import in_distribution_images, ood_sets
from tumorflow.components.training.calibration import negative_log_likelihood
from tumorflow.components.training.export import IN_DISTRIBUTION, OOD_SCORE
from tumorflow.core import serving_layout

pytestmark = pytest.mark.e2e

OLD_OUTPUTS = {"scores", "classes", "predicted_class", "predicted_index", "embedding"}


@pytest.fixture(scope="module")
def served(tiny_model):
    import tensorflow as tf

    return tf.saved_model.load(str(tiny_model / "saved_model"))


def _val_images(tiny_model) -> tuple[list[bytes], np.ndarray]:
    from tumorflow.components.data.tfrecords import read_records

    records = list(read_records(tiny_model.parent / "split", "val"))
    return [r.encoded for r in records], np.array([r.label for r in records])


def test_served_probabilities_are_the_softmax_of_the_logits_over_the_fitted_temperature(
    tiny_model, served
):
    import keras
    import tensorflow as tf

    from tumorflow.components.training.export import decode_for_model

    info = json.loads((tiny_model / "model_info.json").read_text())
    temperature = info["calibration"]["temperature"]
    assert temperature != pytest.approx(1.0, abs=1e-3)
    meta = tiny_model / "saved_model" / serving_layout.ASSETS_EXTRA / serving_layout.MODEL_INFO
    assert json.loads(meta.read_text())["temperature"] == temperature

    images, _ = _val_images(tiny_model)
    answer = served.signatures["serving_default"](image_bytes=tf.constant(images))
    model = keras.saving.load_model(tiny_model / "model.keras", compile=False)
    embed = keras.Model(model.inputs, model.get_layer("embedding").output)
    pixels = tf.stack([decode_for_model(image, 48, info["grayscale"]) for image in images])
    head = model.get_layer("scores")
    logits = embed(pixels).numpy() @ head.kernel.numpy() + head.bias.numpy()
    expected = np.exp(logits / temperature)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(answer["scores"].numpy(), expected, atol=1e-5)
    explained = served.signatures["explain"](image_bytes=tf.constant(images))
    np.testing.assert_allclose(explained["scores"].numpy(), expected, atol=1e-5)


def test_the_fitted_temperature_lowers_the_validation_nll(tiny_model, served):
    import keras
    import tensorflow as tf

    from tumorflow.components.training.export import decode_for_model

    images, labels = _val_images(tiny_model)
    calibrated = served.signatures["serving_default"](image_bytes=tf.constant(images))["scores"]
    model = keras.saving.load_model(tiny_model / "model.keras", compile=False)
    grayscale = json.loads((tiny_model / "model_info.json").read_text())["grayscale"]
    raw = model.predict(
        tf.stack([decode_for_model(image, 48, grayscale) for image in images]), verbose=0
    )
    log_calibrated = np.log(np.maximum(calibrated.numpy(), 1e-300))
    log_raw = np.log(np.maximum(raw, 1e-300))
    assert negative_log_likelihood(log_calibrated, labels, 1.0) < negative_log_likelihood(
        log_raw, labels, 1.0
    )


def test_outputs_are_additive_and_an_old_client_reading_scores_still_works(served):
    import tensorflow as tf

    signature = served.signatures["serving_default"]
    outputs = signature.structured_outputs
    assert set(outputs) == OLD_OUTPUTS | {OOD_SCORE, IN_DISTRIBUTION}
    assert outputs[IN_DISTRIBUTION].dtype == tf.bool
    images = in_distribution_images(1, 48)
    scores = signature(image_bytes=tf.constant(images))["scores"].numpy()
    assert scores.shape == (4, 4)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


def test_the_ood_flag_on_unseen_kinds_of_image_and_on_unseen_phantom_scans(tiny_model, served):
    """The tiny model (a few epochs on 32 images) is measured, not held to the bench's target:
    noise and text are far from any scan; the figures are printed for the record."""
    import tensorflow as tf

    signature = served.signatures["serving_default"]
    flagged = {
        name: float(np.mean(~signature(image_bytes=tf.constant(images))[IN_DISTRIBUTION].numpy()))
        for name, images in ood_sets(20, 48).items()
    }
    test_images = in_distribution_images(8, 48)
    rejected = float(
        np.mean(~signature(image_bytes=tf.constant(test_images))[IN_DISTRIBUTION].numpy())
    )
    print(f"tiny model: OOD flagged {flagged}; in-distribution rejected {rejected:.1%}")
    assert flagged["noise"] >= 0.95 and flagged["text"] >= 0.95
    assert np.mean(list(flagged.values())) >= 0.95
    assert rejected <= 0.25


def test_evaluate_reports_the_ece_before_and_after_and_the_gate_reads_the_calibrated_one(
    tiny_model, tmp_path
):
    import keras
    import tensorflow as tf

    from tumorflow.components.evaluation.evaluate import evaluate_model
    from tumorflow.components.evaluation.metrics import expected_calibration_error
    from tumorflow.components.training.export import decode_for_model

    metrics = evaluate_model(tiny_model, tiny_model.parent / "split", tmp_path, split="val")
    images, labels = _val_images(tiny_model)
    model = keras.saving.load_model(tiny_model / "model.keras", compile=False)
    grayscale = json.loads((tiny_model / "model_info.json").read_text())["grayscale"]
    raw = model.predict(
        tf.stack([decode_for_model(image, 48, grayscale) for image in images]), verbose=0
    )
    calibration = metrics["calibration"]
    assert calibration["ece_before"] == pytest.approx(
        expected_calibration_error(labels, raw), abs=1e-4
    )
    assert calibration["ece"] == metrics["ece"] != pytest.approx(calibration["ece_before"])
    assert (tmp_path / "reliability.png").stat().st_size > 0


def test_the_drift_reference_holds_what_the_server_answers(tiny_model, served, tmp_path):
    """The evaluate step builds the drift reference through the serving SavedModel: its
    confidence is the calibrated probability the server answers (and the monitor compares served
    traffic with), not the Keras model's uncalibrated softmax."""
    import pandas as pd
    import tensorflow as tf

    from tumorflow.components.monitoring.features import build_reference

    path = build_reference(tiny_model.parent / "split", tiny_model / "saved_model", tmp_path, "val")
    table = pd.read_parquet(path)
    images, _ = _val_images(tiny_model)
    scores = served.signatures["serving_default"](image_bytes=tf.constant(images))["scores"]
    np.testing.assert_allclose(table["confidence"], scores.numpy().max(axis=1), atol=1e-6)
    info = json.loads((tiny_model / "model_info.json").read_text())
    predicted = np.asarray(info["classes"])[scores.numpy().argmax(axis=1)]
    assert table["predicted_class"].tolist() == predicted.tolist()
