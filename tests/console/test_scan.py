"""Try a scan: an upload answered by the model server's explain signature over gRPC."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.service


@pytest.fixture()
def served_model(tmp_path):
    """A tumorflow export (a brightness classifier) served in-process as `kidney-ct`."""
    import keras

    from tumorflow.components.training.export import export_serving_model
    from tumorflow.serving.server import ModelServer, ServerOptions

    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="embedding")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="scores")(pooled)
    model = keras.Model(inputs, outputs)
    model.get_layer("scores").set_weights(
        [np.array([[-0.01, 0.01]] * 3, np.float32), np.zeros(2, np.float32)]
    )
    folder = tmp_path / "model"
    folder.mkdir()
    model.save(folder / "model.keras")
    info = {"backbone": "custom_cnn", "image_size": [32, 32], "classes": ["dark", "bright"]}
    (folder / "model_info.json").write_text(json.dumps(info))
    export_serving_model(folder, tmp_path / "models" / "kidney-ct" / "1", model_name="kidney-ct")
    server = ModelServer(
        ServerOptions(
            port=0,
            rest_api_port=0,
            model_name="kidney-ct",
            model_base_path=str(tmp_path / "models" / "kidney-ct"),
        )
    )
    server.start()
    yield server
    server.stop()


def test_an_uploaded_scan_gets_probabilities_and_a_grad_cam_overlay(
    console_factory, served_model, sign_in, csrf_of
):
    client_for, _ = console_factory("kidney-ct", model_server=f"127.0.0.1:{served_model.grpc_port}")
    client = client_for()
    sign_in(client, "victor")
    pixels = np.full((48, 64), 20, np.uint8)
    pixels[30:44, 40:60] = 250
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    csrf = csrf_of(client, "/scan")
    page = client.post(
        "/scan", data={"csrf": csrf}, files={"image": ("scan.png", buffer.getvalue(), "image/png")}
    )
    assert page.status_code == 200, page.text
    assert re.search(r'id="predicted">(dark|bright)<', page.text)
    overlay = re.search(r'src="data:image/png;base64,([^"]+)"', page.text).group(1)
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(overlay))))
    assert picture.shape == (48, 64, 3)
    refused = client.post("/scan", files={"image": ("scan.png", buffer.getvalue(), "image/png")})
    assert refused.status_code == 403
    broken = client.post(
        "/scan", data={"csrf": csrf}, files={"image": ("scan.png", b"not an image", "image/png")}
    )
    assert broken.status_code == 400 and "refused the request" in broken.text


def test_an_uploaded_dicom_is_decoded_as_training_decodes_it_and_sent_as_png(
    console_factory, served_model, sign_in, csrf_of, tmp_path
):
    from dicom_fixtures import ct_phantom, write_dicom

    from tumorflow.components.data.dicom import dicom_to_png
    from tumorflow.core.config import DicomConfig

    client_for, _ = console_factory("kidney-ct", model_server=f"127.0.0.1:{served_model.grpc_port}")
    client = client_for()
    sign_in(client, "victor")
    csrf = csrf_of(client, "/scan")
    dicom = write_dicom(tmp_path / "slice.dcm", ct_phantom(60.0, size=48)).read_bytes()

    def probabilities(name: str, data: bytes, kind: str) -> dict[str, str]:
        page = client.post("/scan", data={"csrf": csrf}, files={"image": (name, data, kind)})
        assert page.status_code == 200, page.text
        table = page.text.split('id="probabilities"')[1].split("</table>")[0]
        return dict(re.findall(r"<td>(\w+)</td><td>([0-9.]+)</td>", table))

    (png,) = dicom_to_png(dicom, DicomConfig())
    from_dicom = probabilities("slice.dcm", dicom, "application/dicom")
    assert set(from_dicom) == {"dark", "bright"}
    # the model saw exactly the PNG the training data's decode makes of this file
    assert from_dicom == probabilities("slice.png", png, "image/png")
    broken = client.post(
        "/scan",
        data={"csrf": csrf},
        files={"image": ("slice.dcm", dicom[:200], "application/dicom")},
    )
    assert broken.status_code == 400 and 'class="message"' in broken.text


def test_a_photo_gets_no_label_but_the_ood_verdict_and_no_grad_cam(
    console_factory, ood_model_server, sign_in, csrf_of
):
    client_for, _ = console_factory(
        "kidney-ct", model_server=f"127.0.0.1:{ood_model_server.grpc_port}"
    )
    client = client_for()
    sign_in(client, "victor")
    csrf = csrf_of(client, "/scan")
    for colour, flagged in (((255, 0, 0), True), ((20, 20, 20), False)):
        buffer = io.BytesIO()
        Image.fromarray(np.full((48, 48, 3), colour, np.uint8)).save(buffer, format="PNG")
        page = client.post(
            "/scan",
            data={"csrf": csrf},
            files={"image": ("photo.png", buffer.getvalue(), "image/png")},
        )
        assert page.status_code == 200, page.text
        predicted = re.search(r'id="predicted">([^<]+)<', page.text).group(1)
        if flagged:
            assert predicted == "not a scan like the training data (score 560.2)"
            assert 'id="ood"' in page.text and 'id="overlay"' not in page.text
            assert 'id="probabilities"' not in page.text
        else:
            assert predicted == "dark" and 'id="overlay"' in page.text
