"""An image the model's OOD detector flags, answered through the model server: the client,
`tumorflow predict` and an old client that reads only `scores` and `classes`."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tumorflow.serving.client import NOT_A_SCAN

pytestmark = pytest.mark.service


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), colour, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_grpc_and_rest_answer_the_flag_and_a_flagged_image_gets_no_label(ood_model_server):
    from tumorflow.serving.client import ModelTarget, explain_grpc, predict_grpc, predict_rest

    target = ModelTarget("kidney-ct")
    images = [png((20, 20, 20)), png((255, 0, 0))]
    for answers in (
        predict_grpc(f"127.0.0.1:{ood_model_server.grpc_port}", images, target),
        predict_rest(f"127.0.0.1:{ood_model_server.rest_port}", images, target),
        [
            a.prediction
            for a in explain_grpc(f"127.0.0.1:{ood_model_server.grpc_port}", images, target)
        ],
    ):
        grey, red = answers
        assert grey.in_distribution and grey.label == grey.predicted_class == "dark"
        assert grey.ood_score == pytest.approx(0.0, abs=1e-3)
        assert not red.in_distribution
        assert red.ood_score == pytest.approx((235**2 + 2 * 20**2) / 100, rel=1e-3)
        assert red.label == f"{NOT_A_SCAN} (score {red.ood_score:.1f})"


def test_an_old_client_asking_only_scores_and_classes_still_gets_them(ood_model_server):
    import tensorflow as tf

    from tumorflow.serving.client import ModelTarget, _grpc_predict_response

    response = _grpc_predict_response(
        f"127.0.0.1:{ood_model_server.grpc_port}",
        [png((250, 250, 250))],
        ModelTarget("kidney-ct"),
        ["scores", "classes"],
        10.0,
    )
    assert set(response.outputs) == {"scores", "classes"}
    scores = tf.make_ndarray(response.outputs["scores"])
    # the temperature (2.0) is folded in: softmax of the logits (-4.5, 4.5) halved
    expected = np.exp([-2.25, 2.25]) / np.exp([-2.25, 2.25]).sum()
    np.testing.assert_allclose(scores[0], expected, atol=1e-5)


def test_predict_says_not_a_scan_instead_of_a_label(ood_model_server, tmp_path, capsys):
    from tumorflow.cli.main import main

    (tmp_path / "grey.png").write_bytes(png((20, 20, 20)))
    (tmp_path / "photo.png").write_bytes(png((255, 0, 0)))
    paths = [str(tmp_path / "grey.png"), str(tmp_path / "photo.png")]
    server = f"127.0.0.1:{ood_model_server.grpc_port}"
    assert main(["predict", "--server", server, "--model_name", "kidney-ct", *paths]) == 0
    grey, photo = capsys.readouterr().out.strip().splitlines()
    assert grey.startswith(f"{paths[0]}: dark") and "dark=" in grey
    assert photo.startswith(f"{paths[1]}: {NOT_A_SCAN} (score 560.2")
    assert "dark=" not in photo
