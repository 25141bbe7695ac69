"""Client of a TF Serving endpoint (ours or the real one): encoded images in, classes out.

gRPC uses the official tensorflow-serving-api stubs; REST uses TF Serving's JSON API. Only the
encoded image bytes travel: the model decodes them (signature input `image_bytes`). DICOM is
converted here, client-side, with the decode the training data went through (`encoded_images`).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tumorflow.components.data.dicom import encoded_images as encoded_images
from tumorflow.components.training.export import (
    EXPLAIN_SIGNATURE,
    HEATMAP,
    IN_DISTRIBUTION,
    INPUT,
    OOD_SCORE,
)
from tumorflow.core.errors import TumorflowError

IMAGE_INPUT = INPUT
# What predict, the console and the PACS router say instead of a class for an image the model's
# OOD detector flags.
NOT_A_SCAN = "not a scan like the training data"


class ServerUnavailableError(TumorflowError):
    """The model server cannot be reached or refused the request."""


class RequestRejectedError(ServerUnavailableError):
    """The server refused the request's content (INVALID_ARGUMENT, HTTP 400): e.g. an image it
    cannot decode."""


@dataclass(frozen=True)
class ImagePrediction:
    """One image's answer: the arg-max class and the probability of every class, and, from a
    model exported with an OOD detector, its `ood_score` and whether the image is in distribution
    (a model without one answers every image as in distribution)."""

    predicted_class: str
    probabilities: dict[str, float]
    model_version: int | None
    ood_score: float | None = None
    in_distribution: bool = True

    @property
    def label(self) -> str:
        """What to say about the image: its class, or that it is no scan like the training data."""
        if self.in_distribution:
            return self.predicted_class
        return f"{NOT_A_SCAN} (score {self.ood_score:.1f})"


@dataclass(frozen=True)
class ExplainedPrediction:
    """One image's answer with the Grad-CAM heat map of its predicted class."""

    prediction: ImagePrediction
    heatmap: Any


@dataclass(frozen=True)
class ModelTarget:
    """Which model version and signature a request is for (TF Serving's ModelSpec)."""

    name: str
    version: int | None = None
    label: str | None = None
    signature_name: str = ""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rows(
    scores: Sequence,
    classes: Sequence,
    version: int | None,
    ood_scores: Sequence | None = None,
    in_distribution: Sequence | None = None,
) -> list[ImagePrediction]:
    results = []
    for index, (row_scores, row_classes) in enumerate(zip(scores, classes, strict=True)):
        probabilities = {_text(c): float(s) for c, s in zip(row_classes, row_scores, strict=True)}
        best = max(probabilities, key=probabilities.__getitem__)
        ood = {}
        if ood_scores is not None and in_distribution is not None:
            ood = {
                "ood_score": float(ood_scores[index]),
                "in_distribution": bool(in_distribution[index]),
            }
        results.append(ImagePrediction(best, probabilities, version, **ood))
    return results


def _grpc_rows(response: Any) -> list[ImagePrediction]:
    """The rows of a Predict response, with the OOD outputs where the model has them."""
    import tensorflow as tf

    outputs = response.outputs
    ood = [
        tf.make_ndarray(outputs[name]) if name in outputs else None
        for name in (OOD_SCORE, IN_DISTRIBUTION)
    ]
    return _rows(
        tf.make_ndarray(outputs["scores"]),
        tf.make_ndarray(outputs["classes"]),
        response.model_spec.version.value,
        *ood,
    )


def _grpc_predict_response(
    server: str,
    images: Sequence[bytes],
    target: ModelTarget,
    outputs: Sequence[str],
    timeout: float,
) -> Any:
    """One PredictionService.Predict call; its response, or ServerUnavailableError."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = target.name
    request.model_spec.signature_name = target.signature_name
    if target.version is not None:
        request.model_spec.version.value = target.version
    elif target.label:
        request.model_spec.version_label = target.label
    request.inputs[IMAGE_INPUT].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
    request.output_filter.extend(outputs)
    with grpc.insecure_channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            return stub.Predict(request, timeout=timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            # An HTTP/1 server answers gRPC's HTTP/2 preface with something that is no HTTP/2.
            if any(sign in details.lower() for sign in ("http1", "parsing http/2")):
                raise ServerUnavailableError(
                    f"{server} speaks HTTP/1, not gRPC: is it the REST port? Add --rest, or give "
                    "the gRPC port (--port of `tumorflow serve`, default 8500)"
                ) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServerUnavailableError(
                    f"no model server answers at {server} ({code.name}); start one with "
                    "`tumorflow serve` or check --server"
                ) from None
            error = (
                RequestRejectedError
                if code == grpc.StatusCode.INVALID_ARGUMENT
                else ServerUnavailableError
            )
            raise error(f"{server} refused the request: {code.name}: {details}") from None


def predict_grpc(
    server: str, images: Sequence[bytes], target: ModelTarget, timeout: float = 10.0
) -> list[ImagePrediction]:
    """Predict over gRPC with PredictionService.Predict; ServerUnavailableError on failure.

    No output filter: a model with an OOD detector answers its outputs too, and one without it
    is not asked for outputs it lacks."""
    return _grpc_rows(_grpc_predict_response(server, images, target, [], timeout))


def explain_grpc(
    server: str, images: Sequence[bytes], target: ModelTarget, timeout: float = 30.0
) -> list[ExplainedPrediction]:
    """Predict with the model's `explain` signature over gRPC: each image's answer and the
    Grad-CAM heat map of its predicted class (0..1, at the model's input resolution)."""
    import dataclasses

    import tensorflow as tf

    target = dataclasses.replace(target, signature_name=EXPLAIN_SIGNATURE)
    response = _grpc_predict_response(server, images, target, [], timeout)
    rows = _grpc_rows(response)
    heatmaps = tf.make_ndarray(response.outputs[HEATMAP])
    return [ExplainedPrediction(row, heatmap) for row, heatmap in zip(rows, heatmaps, strict=True)]


def predict_rest(
    server: str, images: Sequence[bytes], target: ModelTarget, timeout: float = 10.0
) -> list[ImagePrediction]:
    """Predict over TF Serving's REST API (`:predict`, row format, b64 images)."""
    path = f"/v1/models/{target.name}"
    if target.version is not None:
        path += f"/versions/{target.version}"
    elif target.label:
        path += f"/labels/{target.label}"
    body: dict[str, object] = {
        "instances": [{IMAGE_INPUT: {"b64": base64.b64encode(i).decode()}} for i in images]
    }
    if target.signature_name:
        body["signature_name"] = target.signature_name
    request = urllib.request.Request(
        f"http://{server}{path}:predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    not_rest = ServerUnavailableError(
        f"{server} does not answer TF Serving's REST API: is it the gRPC port? Drop --rest, or "
        "give the REST port (--rest_api_port of `tumorflow serve`, default 8501)"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]
        error = RequestRejectedError if exc.code == 400 else ServerUnavailableError
        raise error(f"{server} refused the request: HTTP {exc.code}: {detail}") from None
    except (http.client.HTTPException, ConnectionResetError, ValueError):
        # A gRPC (HTTP/2) port answers an HTTP/1 request with bytes that are no status line.
        raise not_rest from None
    except OSError as exc:
        raise ServerUnavailableError(
            f"no model server answers at http://{server} ({exc}); start one with `tumorflow serve` "
            "or check --server"
        ) from None
    try:
        rows = answer["predictions"]
        ood = [
            [r[name] for r in rows] if all(name in r for r in rows) else None
            for name in (OOD_SCORE, IN_DISTRIBUTION)
        ]
        return _rows(
            [r["scores"] for r in rows], [r["classes"] for r in rows], target.version, *ood
        )
    except (KeyError, TypeError):
        raise not_rest from None


def predict_each(
    predict: Callable[..., list[ImagePrediction]],
    server: str,
    images: Sequence[bytes],
    target: ModelTarget,
    timeout: float = 10.0,
) -> list[ImagePrediction | RequestRejectedError]:
    """`predict` (`predict_grpc` or `predict_rest`) of a batch, answering every image it can.

    One request for the batch; when the server rejects it (an image it cannot decode fails the
    whole batch), one request per image, so that the rejected ones are named and the others
    answered. Server unavailability still raises.
    """
    try:
        return list(predict(server, images, target, timeout=timeout))
    except RequestRejectedError as rejected:
        if len(images) == 1:
            return [rejected]
    answers: list[ImagePrediction | RequestRejectedError] = []
    for image in images:
        try:
            answers.extend(predict(server, [image], target, timeout=timeout))
        except RequestRejectedError as rejected:
            answers.append(rejected)
    return answers
