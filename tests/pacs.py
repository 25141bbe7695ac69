"""A real PACS for the tests: Orthanc with its DICOMweb plugin on loopback, credentials on.

`start_orthanc` writes a config into a fresh folder (storage, index, log), starts `Orthanc` on
free ports and waits until its REST API answers; `OrthancServer.stop` ends that process by id.
`FlakyProxy` sits in front of a server and answers 503 to the first N requests. Importable as
`pacs` (pytest's `pythonpath`).
"""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port, wait_until

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USERNAME, PASSWORD = "tumorflow", "pacs-secret-7f3a"


def orthanc_missing() -> str | None:
    """Why Orthanc with DICOMweb cannot run here, or None when it can."""
    if shutil.which(ORTHANC) is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


@dataclass
class OrthancServer:
    """A running Orthanc: its REST root, its DICOMweb root and the process serving them."""

    url: str
    process: subprocess.Popen
    log_path: Path
    username: str = USERNAME
    password: str = PASSWORD

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def _request(self, path: str, data: bytes | None = None, content_type: str = "") -> bytes:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(
            f"{self.url}{path}", data=data, headers=headers, method="POST" if data else "GET"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def store(self, dicom_bytes: bytes) -> dict:
        """POST /instances: store one Part 10 file; Orthanc's answer (its ids)."""
        return json.loads(self._request("/instances", dicom_bytes, "application/dicom"))

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def post(self, path: str, data: bytes, content_type: str) -> bytes:
        return self._request(path, data, content_type)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_orthanc(root: Path, timeout: float = 60) -> OrthancServer:
    """Start Orthanc with a generated config and storage under `root`; return once it answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "TUMORFLOW-TEST",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USERNAME: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = root / "orthanc.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=root
        )
    server = OrthancServer(f"http://127.0.0.1:{port}", process, log_path)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            return bool(server.get_json("/system"))
        except (OSError, urllib.error.URLError):
            return False

    try:
        wait_until(answers, timeout, "Orthanc answering", interval=0.2)
    except BaseException:
        server.stop()
        raise
    return server


class FlakyProxy:
    """A loopback HTTP proxy to `target` that answers 503 to the first `failures` requests and
    records every request path."""

    def __init__(self, target: str, failures: int) -> None:
        self.target = target.rstrip("/")
        self.failures = failures
        self.requests = 0
        self.paths: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with proxy._lock:
                    proxy.requests += 1
                    proxy.paths.append(self.path)
                    fail = proxy.requests <= proxy.failures
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                request = urllib.request.Request(proxy.target + self.path, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, body, reply = response.status, response.read(), response.headers
                except urllib.error.HTTPError as exc:
                    status, body, reply = exc.code, exc.read(), exc.headers
                self.send_response(status)
                self.send_header("Content-Type", reply.get("Content-Type", ""))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
