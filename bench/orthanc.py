"""A PACS on this machine: Orthanc with its DICOMweb plugin on loopback, credentials on.

`tumorflow bench route` measures against one, and the tests talk to one (tests/pacs.py).
`start_orthanc` writes a config into a folder (storage, index, log), starts `Orthanc` on free
ports and returns once its REST API answers; `OrthancServer.stop` ends that process by its id.
Orthanc and the plugin are Debian packages: `apt-get install orthanc orthanc-dicomweb`.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tumorflow.core.errors import ConfigError, SourceUnavailableError

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CONFIG_FILE, LOG_FILE = "orthanc.json", "orthanc.log"


def orthanc_missing() -> str | None:
    """Why Orthanc with DICOMweb cannot run here, or None when it can."""
    if shutil.which(ORTHANC) is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.exists():
        return (
            f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; "
            "apt-get install orthanc-dicomweb)"
        )
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class OrthancServer:
    """A running Orthanc: its REST root, its DICOMweb root, its login and the process."""

    url: str
    process: subprocess.Popen
    log_path: Path
    username: str
    password: str

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

    def restarted(self, timeout: float = 60) -> OrthancServer:
        """Orthanc again on the same config (port, storage, login) after `stop()`."""
        return _launch(self.log_path.parent, self.url, self.username, self.password, timeout)


def start_orthanc(
    root: Path, username: str, password: str, *, name: str = "TUMORFLOW", timeout: float = 60
) -> OrthancServer:
    """Start Orthanc with a generated config and its storage under `root`, the one user
    `username`; return once it answers."""
    missing = orthanc_missing()
    if missing:
        raise ConfigError(missing)
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": name,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "DicomPort": _free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return _launch(root, f"http://127.0.0.1:{port}", username, password, timeout)


def _launch(root: Path, url: str, username: str, password: str, timeout: float) -> OrthancServer:
    """Run Orthanc on the config in `root` (its log appended to); return once it answers."""
    log_path = root / LOG_FILE
    with log_path.open("a") as log:
        process = subprocess.Popen(
            [ORTHANC, str(root / CONFIG_FILE)], stdout=log, stderr=subprocess.STDOUT, cwd=root
        )
    server = OrthancServer(url, process, log_path, username, password)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SourceUnavailableError(
                f"Orthanc exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            server.get_json("/system")
            return server
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                server.stop()
                raise SourceUnavailableError(
                    f"Orthanc did not answer within {timeout:.0f} s; see {log_path}"
                ) from None
            time.sleep(0.2)
