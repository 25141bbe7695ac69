"""A real PACS for the tests: Orthanc with its DICOMweb plugin on loopback, credentials on.

The starter is the package's own (`tumorflow.bench.orthanc`, which `tumorflow bench route` uses):
`start_orthanc` here gives it this suite's login. `FlakyProxy` sits in front of a server and
answers 503 to the first N requests. Importable as `pacs` (pytest's `pythonpath`).
"""

from __future__ import annotations

import http.server
import io
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_fixtures import FAKE_PHI, ct_phantom, write_dicom
from helpers import free_port

from tumorflow.bench import orthanc
from tumorflow.bench.orthanc import OrthancServer, orthanc_missing

__all__ = [
    "PASSWORD",
    "USERNAME",
    "FlakyProxy",
    "OrthancServer",
    "orthanc_missing",
    "running_orthanc",
    "start_orthanc",
]

USERNAME, PASSWORD = "tumorflow", "pacs-secret-7f3a"


def start_orthanc(root: Path, timeout: float = 60) -> OrthancServer:
    """Orthanc with a generated config and storage under `root`, this suite's login; returns
    once it answers."""
    return orthanc.start_orthanc(root, USERNAME, PASSWORD, name="TUMORFLOW-TEST", timeout=timeout)


def running_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """The body of an `orthanc` fixture: skips where Orthanc or its DICOMweb plugin is missing,
    else yields a started server (credentials on, temporary storage) and stops it after."""
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


def store_ct_study(
    server: OrthancServer,
    folder: Path,
    *,
    patient: int,
    level_hu: float,
    study_description: str,
    series_description: str,
    slices: int = 3,
    size: int = 64,
    institution: str = FAKE_PHI["InstitutionName"],
    manufacturer: str = "ACME Medical",
    compress_first: bool = False,
) -> str:
    """Store one CT study of a patient with PHI-like tags (one series of `slices` phantom slices
    with a disc of `level_hu` HU; with `compress_first`, the first one RLE-compressed) in `server`;
    the files are written under `folder` first. Returns the Study Instance UID."""
    import pydicom
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    for index in range(slices):
        path = write_dicom(
            folder / f"{study}-{index}.dcm",
            ct_phantom(level_hu, size=size, seed=patient * 100 + index),
            patient_id=f"{FAKE_PHI['PatientID']}-{patient}",
            patient_name=f"{FAKE_PHI['PatientName']}{patient}",
            institution=institution,
            manufacturer=manufacturer,
            study_uid=study,
            compress=compress_first and index == 0,
        )
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series
        dataset.StudyDescription = study_description
        dataset.SeriesDescription = series_description
        dataset.InstanceNumber = index + 1
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        server.store(buffer.getvalue())
    return study


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
