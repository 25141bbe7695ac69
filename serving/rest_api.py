"""TF Serving's REST API (`/v1/models/...`) and its Prometheus monitoring endpoint.

JSON shapes follow TF Serving: row (`instances` → `predictions`) and columnar (`inputs` →
`outputs`) predict formats, `{"b64": ...}` for binary strings, status and metadata as the JSON
form of the gRPC responses, and errors as `{"error": "..."}` with TF Serving's HTTP codes.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_status_pb2

from tumorflow.serving.grpc_api import status_proto
from tumorflow.serving.inference import InferenceService, with_context
from tumorflow.serving.prometheus import PROMETHEUS_PATH
from tumorflow.serving.servable import Signature
from tumorflow.serving.status import ServingError, invalid_argument

logger = logging.getLogger(__name__)

_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>-?\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?/?$"
)


def _decode_b64(value: Any) -> Any:
    """Replace every {"b64": "..."} in a JSON value by the bytes it encodes."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError) as exc:
                raise invalid_argument(f"invalid base64 in {{'b64': ...}}: {exc}") from exc
        return {key: _decode_b64(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_b64(item) for item in value]
    return value


def _to_array(value: Any, name: str, spec: tf.TensorSpec) -> np.ndarray:
    try:
        if spec.dtype == tf.string:
            array = np.array(value, dtype=object)
            flat = array.reshape(-1)
            for index, item in enumerate(flat):
                if isinstance(item, str):
                    flat[index] = item.encode()
                elif not isinstance(item, bytes):
                    raise TypeError(
                        f"expected strings or {{'b64': ...}}, got {type(item).__name__}"
                    )
            return flat.reshape(array.shape)
        array = np.array(value)
        if array.dtype == object or array.dtype.kind in "SU":
            raise TypeError("values are not numbers of a regular (non-ragged) shape")
        return array.astype(spec.dtype.as_numpy_dtype)
    except (TypeError, ValueError) as exc:
        raise invalid_argument(
            f"input '{name}' cannot be read as {spec.dtype.name}: {exc}"
        ) from exc


def parse_predict_body(body: Any, signature: Signature) -> tuple[dict[str, np.ndarray], bool]:
    """Inputs of a REST predict body, and whether it used the row (`instances`) format."""
    if not isinstance(body, dict):
        raise invalid_argument("the request body must be a JSON object")
    if ("instances" in body) == ("inputs" in body):
        raise invalid_argument('the request body must hold exactly one of "instances" or "inputs"')
    names = sorted(signature.inputs)
    if "instances" in body:
        instances = _decode_b64(body["instances"])
        if not isinstance(instances, list) or not instances:
            raise invalid_argument('"instances" must be a non-empty list')
        if all(isinstance(row, dict) for row in instances):
            columns: dict[str, list] = {}
            for row in instances:
                if sorted(row) != sorted(instances[0]):
                    raise invalid_argument("every instance must name the same inputs")
                for key, item in row.items():
                    columns.setdefault(key, []).append(item)
        elif len(names) == 1:
            columns = {names[0]: instances}
        else:
            raise invalid_argument(
                f"the signature has inputs {names}: give each instance as an object of named inputs"
            )
        row_format = True
    else:
        inputs = _decode_b64(body["inputs"])
        if isinstance(inputs, dict):
            columns = inputs
        elif len(names) == 1:
            columns = {names[0]: inputs}
        else:
            raise invalid_argument(f'the signature has inputs {names}: "inputs" must name them')
        row_format = False
    arrays = {}
    for key, value in columns.items():
        spec = signature.inputs.get(key)
        if spec is None:
            raise invalid_argument(
                f"input tensor alias not found in signature: {key}. "
                f"Inputs expected to be in the set {{{','.join(names)}}}."
            )
        arrays[key] = _to_array(value, key, spec)
    return arrays, row_format


def _jsonable(name: str, array: np.ndarray) -> Any:
    if array.dtype == object or array.dtype.kind == "S":

        def convert(item: Any) -> Any:
            if isinstance(item, list):
                return [convert(x) for x in item]
            if name.endswith("_bytes"):
                return {"b64": base64.b64encode(item).decode()}
            try:
                return item.decode()
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(item).decode()}

        return convert(array.tolist())
    return array.tolist()


def format_predict_response(outputs: dict[str, np.ndarray], row_format: bool) -> dict[str, Any]:
    """TF Serving's predict response: `predictions` rows or columnar `outputs`."""
    if not row_format:
        if len(outputs) == 1:
            ((name, array),) = outputs.items()
            return {"outputs": _jsonable(name, array)}
        return {"outputs": {name: _jsonable(name, array) for name, array in outputs.items()}}
    columns = {name: _jsonable(name, array) for name, array in outputs.items()}
    if len(columns) == 1:
        return {"predictions": next(iter(columns.values()))}
    rows = len(next(iter(columns.values())))
    return {"predictions": [{name: col[i] for name, col in columns.items()} for i in range(rows)]}


def _example_from_json(row: Any) -> tf.train.Example:
    if not isinstance(row, dict):
        raise invalid_argument("each example must be a JSON object of features")
    example = tf.train.Example()
    for key, value in _decode_b64(row).items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[key]
        if all(isinstance(v, bytes | str) for v in values):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, int | float) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        else:
            raise invalid_argument(f"feature '{key}' mixes value types")
    return example


def _examples_from_body(body: Any) -> list[tf.train.Example]:
    """The `examples` of a :classify or :regress body, each merged with the optional `context`."""
    examples = body.get("examples") if isinstance(body, dict) else None
    if not isinstance(examples, list):
        raise invalid_argument('the request body must hold an "examples" list')
    parsed = [_example_from_json(row) for row in examples]
    context = body.get("context")
    return parsed if context is None else with_context(_example_from_json(context), parsed)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RestServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_json(self, status: int, body: Any) -> None:
        self._send(status, json.dumps(body).encode())

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def do_GET(self) -> None:
        if self.path.split("?")[0] == PROMETHEUS_PATH:
            self._send(200, self.server.service.metrics.exposition(), "text/plain; version=0.0.4")
            return
        self._dispatch("GET", b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_body_bytes:
            self._drain(length)
            self.close_connection = True
            self._error(
                413,
                f"request body of {length} bytes exceeds the limit of "
                f"{self.server.max_body_bytes} bytes",
            )
            return
        self._dispatch("POST", self.rfile.read(length))

    def _drain(self, length: int) -> None:
        """Read and drop a refused body (up to a bound) so that the client sees the 413."""
        remaining = min(length, 16 * self.server.max_body_bytes)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                return
            remaining -= len(chunk)

    def _dispatch(self, method: str, raw: bytes) -> None:
        match = _MODEL_PATH.match(self.path.split("?")[0])
        if match is None or (method == "GET") == bool(match["verb"]):
            self._error(404, f"Malformed request: {method} {self.path}")
            return
        name = match["name"]
        version = int(match["version"]) if match["version"] is not None else None
        label = match["label"]
        api = match["verb"] or ("metadata" if match["metadata"] else "status")
        service = self.server.service
        try:
            with service.metrics.track(name, api, "rest"):
                body = self._answer(api, name, version, label, raw)
        except ServingError as exc:
            self._error(exc.http_status, exc.message)
        except Exception as exc:
            logger.exception("REST request failed")
            self._error(500, f"internal error: {exc}")
        else:
            self._send_json(200, body)

    def _answer(
        self, api: str, name: str, version: int | None, label: str | None, raw: bytes
    ) -> Any:
        service = self.server.service
        if api == "status":
            response = get_model_status_pb2.GetModelStatusResponse()
            for number, status in service.status(name, version=version, label=label).items():
                response.model_version_status.append(status_proto(number, status))
            return json_format.MessageToDict(
                response,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )
        if api == "metadata":
            servable = service.metadata(name, version=version, label=label)
            return {
                "model_spec": {
                    "name": servable.name,
                    "signature_name": "",
                    "version": str(servable.version),
                },
                "metadata": {
                    "signature_def": json_format.MessageToDict(
                        servable.signature_def_map(), preserving_proto_field_name=True
                    )
                },
            }
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid_argument(f"JSON Parse error: {exc}") from exc
        signature_name = body.get("signature_name", "") if isinstance(body, dict) else ""
        if api in ("classify", "regress"):
            examples = _examples_from_body(body)
            if api == "regress":
                regression = service.regress(
                    name, examples, version=version, label=label, signature_name=signature_name
                )
                return {"results": regression.values}
            result = service.classify(
                name, examples, version=version, label=label, signature_name=signature_name
            )
            return {"results": [[[c, s] for c, s in pairs] for pairs in result.results]}
        servable = service.repository.resolve(name, version, label)
        inputs, row_format = parse_predict_body(body, servable.signature(signature_name))
        prediction = service.predict(
            name,
            inputs,
            version=servable.version,
            signature_name=signature_name,
        )
        return format_predict_response(prediction.outputs, row_format)


class RestServer(HTTPServer):
    """HTTP server answering TF Serving's REST API with a bounded pool of worker threads."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        service: InferenceService,
        *,
        num_threads: int = 16,
        max_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(address, _Handler)
        self.service = service
        self.max_body_bytes = max_body_bytes
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="rest")
        self._thread: threading.Thread | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        self._pool.submit(self._process, request, client_address)

    def _process(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="rest-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._pool.shutdown(wait=True, cancel_futures=True)
