"""`tumorflow run --runner docker` against an engine that answers but cannot start containers (a
Docker API on a Unix socket of the test's own, answering as podman does on a host whose cgroups
its OCI runtime refuses): one line naming the engine's error, and no task started."""

from __future__ import annotations

import json
import re
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest

IMAGE = "localhost/tumorflow-python:test"
ENGINE_ERROR = (
    "crun: cgroups in hybrid mode not supported, drop all controllers from cgroupv2: OCI runtime "
    "error"
)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _FakeEngine(BaseHTTPRequestHandler):
    """Just enough of the Docker Engine API: ping, version, the image, and a container create
    refused with the runtime's error."""

    requests: ClassVar[list[str]] = []

    def address_string(self) -> str:  # a Unix socket has no client address
        return "engine-client"

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header(
            "Content-Type", "application/json" if status != 200 or body else "text/plain"
        )
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._answer(200, b"")

    def do_GET(self) -> None:
        path = re.sub(r"^/v[0-9.]+", "", self.path.split("?")[0])
        self.requests.append(f"GET {path}")
        if path == "/_ping":
            self._answer(200, b"OK")
        elif path == "/version":
            self._answer(200, {"ApiVersion": "1.41", "Version": "4.3.1", "MinAPIVersion": "1.24"})
        elif path.startswith("/images/") and path.endswith("/json"):
            self._answer(200, {"Id": "sha256:" + "ab" * 32, "RepoTags": [IMAGE]})
        else:
            self._answer(404, {"message": f"no such thing: {path}"})

    def do_POST(self) -> None:
        path = re.sub(r"^/v[0-9.]+", "", self.path.split("?")[0])
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.requests.append(f"POST {path}")
        if path == "/containers/create":
            self._answer(500, {"message": ENGINE_ERROR, "response": 500})
        else:
            self._answer(404, {"message": f"no such thing: {path}"})


@pytest.fixture()
def refusing_engine(tmp_path: Path):
    socket_path = tmp_path / "engine.sock"
    _FakeEngine.requests = []
    server = _UnixHTTPServer(str(socket_path), _FakeEngine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"unix://{socket_path}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_engine_that_cannot_start_containers_is_one_line_naming_its_error(
    tmp_path: Path, refusing_engine: str
):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tumorflow.cli.main",
            "run",
            "--runner",
            "docker",
            "--image",
            IMAGE,
            "--run-root",
            str(tmp_path / "runs"),
        ],
        cwd=tmp_path,
        env={"DOCKER_HOST": refusing_engine, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tumorflow run: error: --runner docker: the engine at unix://"), line
    assert f"cannot start a container of {IMAGE}: {ENGINE_ERROR}" in line
    assert "POST /containers/create" in _FakeEngine.requests
    assert not (tmp_path / "runs" / "pipeline_root").exists()  # no task was started
